"""Ops helpers of the ``wstunnel`` program: ``token new``, ``config check``, ``status`` and
``admin passwd``.

Each takes its own flags (Go style ``-flag`` and GNU style ``--flag``, like ``srv`` and ``cli``)
and returns an exit status. A bad configuration file raises :class:`~wstunnel.errors.ConfigError`,
which :func:`wstunnel.commands.main` turns into exit 78 as for the daemons; anything else that
stops a helper is an :class:`~wstunnel.ops.common.OpsError` carrying its own exit status;
:func:`wstunnel.commands.main` dispatches to them.
"""
