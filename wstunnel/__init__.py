"""wstunnel: an HTTP-over-WebSocket reverse tunnel, wire-compatible with the original WStunnel.

The public surface is small: the two daemons are started through :func:`wstunnel.commands.main`
(the ``wstunnel`` console script); everything else is an implementation module.
"""

__version__ = "0.2.0"

__all__ = ["__version__"]
