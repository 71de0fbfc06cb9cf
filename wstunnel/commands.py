"""The ``wstunnel`` program: ``srv``, ``cli`` and ``version``.

Thin on purpose: parse flags, load settings (exit 78, EX_CONFIG, naming the flag or file and key
on any bad value, before a port is bound), set up logging, then hand over to the daemon.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, TypeVar

import trio

from wstunnel import __version__, daemon, limits, logs, logtargets
from wstunnel.config import ClientSettings, ServerSettings, load_settings
from wstunnel.errors import ConfigError, DialError, sole_exception
from wstunnel.flags import FlagParser, add_flags, parse_flags
from wstunnel.service import ServiceNotifier

EX_CONFIG = 78
# What main() dispatches on (the shell completion offers the same words).
OPS_COMMANDS = ("token", "config", "status", "admin")
COMMANDS = ("srv", "cli", "version", *OPS_COMMANDS)
TOKEN_VARIABLE = "WSTUNCLI_TOKEN"

CLIENT_STOP_GRACE = 3.0
# Descriptors a client holds besides its backend connections: the tunnel (long-poll: up to 4),
# standard streams, the event loop's, a log file, the journal's socket, a few to spare.
CLIENT_OWN_FILES = 32
SettingsT = TypeVar("SettingsT", ServerSettings, ClientSettings)


def daemon_parser(prog: str, model: type[ServerSettings] | type[ClientSettings]) -> FlagParser:
    parser = FlagParser(prog)
    add_flags(parser, model)
    return parser


def _hide_token_from_ps(argv: Sequence[str]) -> None:
    """Re-exec without ``-token`` on the command line, so ps shows no secret (SPEC §1).

    The value moves to the environment, which only root and the process's own user can read;
    precedence is unchanged because nothing else sets that variable after us.
    """
    if os.environ.get("WSTUNNEL_NO_REEXEC"):
        return
    rest: list[str] = []
    token: str | None = None
    items = list(argv)
    while items:
        item = items.pop(0)
        name, eq, value = item.partition("=")
        if name in ("-token", "--token"):
            token = value if eq else (items.pop(0) if items else None)
            continue
        rest.append(item)
    if token is None:
        return
    environ = dict(os.environ, **{TOKEN_VARIABLE: token})
    os.execve(sys.executable, [sys.executable, "-m", "wstunnel", "cli", *rest], environ)


def run_ops(command: str, argv: Sequence[str]) -> int:
    """``wstunnel token|config|status|admin ...``: the ops helper's exit status."""
    # Imported here: each helper pulls in what only it needs (httpx, tomli-w).
    from wstunnel.ops import admin, configcheck, status, token
    from wstunnel.ops.common import OpsError

    mains = {"token": token.main, "config": configcheck.main, "status": status.main,
             "admin": admin.main}
    try:
        return mains[command](list(argv))
    except OpsError as exc:
        print(f"wstunnel {command}: {exc}", file=sys.stderr)
        return exc.exit_code


def run_server(argv: Sequence[str]) -> int:
    from wstunnel.server.app import TunnelServer

    flags = parse_flags(daemon_parser("wstunnel srv", ServerSettings), argv)
    settings = load_settings(ServerSettings, flags)
    _configure_logs("wstunsrv", settings)
    log = logs.EventLogger("WStunsrv")
    notifier = ServiceNotifier()
    open_files = limits.raise_open_files_limit()  # logged with what it allows, once listening

    async def main(lines: daemon.HeldLinesWriter) -> None:
        server = TunnelServer(settings, log, open_files=open_files)

        def stop() -> None:
            _stop_collecting()
            server.stop()

        async def reload() -> None:
            _reload(log, notifier, ServerSettings, flags, server.apply, "wstunsrv")
            await server.revoke_disallowed()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, log, notifier, stop)
            nursery.start_soon(daemon.reload_on_sighup, reload)
            nursery.start_soon(daemon.report_on_sigusr1, server.report)
            nursery.start_soon(notifier.watchdog_forever)
            nursery.start_soon(lines.write_late)
            async with trio.open_nursery() as serving:
                port = await serving.start(server.run)
                notifier.ready(f"listening on {settings.host}:{port}")
            nursery.cancel_scope.cancel()

    with daemon.pidfile(settings.pidfile):
        _run(main)
    # Stopped cleanly: every socket is closed, the pid file is gone, "Stopped" is logged.
    _exit_now(0)


def _stop_collecting() -> None:
    """The server is stopping: no more cyclic garbage collection.

    With 10,000 tunnels the heap holds millions of objects, and each full collection triggered
    while the tunnels close walks all of them; the process is about to exit, which frees the
    memory anyway. freeze() also takes everything alive now out of any collection that may
    still run (a gc.collect() by a library, say).
    """
    gc.disable()
    gc.freeze()


def _exit_now(code: int) -> NoReturn:
    """Exit without the interpreter's teardown, once the server has stopped.

    Tearing down a heap that held thousands of tunnels (freeing each object, a last collection)
    took 1.5 s of a 5.3 s stop with 3,000 tunnels, after the server had nothing left to do. Only
    called after trio.run() has returned (every socket closed) and the pid file is removed; the
    log handlers are flushed and closed here (stderr for journald, the log file, syslog), which
    is all the interpreter's exit would have done for us: we register no atexit hooks.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or gone: nothing left to save
            stream.flush()
    os._exit(code)


def run_client(argv: Sequence[str]) -> int:
    from wstunnel.client.agent import TunnelClient

    parser = daemon_parser("wstunnel cli", ClientSettings)
    flags = parse_flags(parser, argv)
    # Validate before the re-exec, so an error names the -token flag the user typed and not
    # the environment variable the re-exec moves it to.
    settings = load_settings(ClientSettings, flags)
    _hide_token_from_ps(argv)
    _configure_logs("wstuncli", settings)
    log = logs.EventLogger("WStuncli")
    _log_client_limits(log, settings, limits.raise_open_files_limit())
    notifier = ServiceNotifier()
    client = TunnelClient(settings, log, notifier)

    async def reload() -> None:
        _reload(log, notifier, ClientSettings, flags, client.apply, "wstuncli")

    async def main(lines: daemon.HeldLinesWriter) -> None:
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, log, notifier, stop.set)
            nursery.start_soon(daemon.reload_on_sighup, reload)
            nursery.start_soon(daemon.report_on_sigusr1, client.report)
            nursery.start_soon(notifier.watchdog_forever)
            nursery.start_soon(lines.write_late)
            nursery.start_soon(client.run)
            # The configuration is valid and the connect loop runs: that is "ready" for a client.
            notifier.ready(f"connecting to {client.address.url}")
            await stop.wait()
            await client.close()
            # Let the session unwind on its own (it sees its Close frame answered) before cancelling.
            with trio.move_on_after(CLIENT_STOP_GRACE):
                await client.stopped.wait()
            nursery.cancel_scope.cancel()
        log.info("Stopped")

    with daemon.pidfile(settings.pidfile):
        _run(main)
    return 0


def _log_client_limits(log: logs.EventLogger, settings: ClientSettings,
                       open_files: limits.OpenFilesLimit) -> None:
    """What the client runs with; a warning if its backend connections may not all fit."""
    raised = {"raised_from": open_files.started_with} if open_files.raised else {}
    log.info("Limits", open_files=open_files.soft, **raised,
             max_concurrent_requests=settings.max_concurrent_requests)
    # One descriptor per backend connection (at most max_concurrent_requests), the tunnel's,
    # and the few the process holds anyway (standard streams, the event loop, the log).
    needed = settings.max_concurrent_requests + CLIENT_OWN_FILES
    if needed > open_files.soft:
        log.warning("Limits", open_files=open_files.soft, needed=needed,
                    reason="max_concurrent_requests does not fit the open-files limit: requests "
                           "that find no descriptor get 503; raise LimitNOFILE")


def _run(main: Callable[[daemon.HeldLinesWriter], Awaitable[None]]) -> None:
    # What exists now (modules, settings, logging) lives as long as the process: out of the
    # cyclic collector's sight, its full collections walk only what serving creates (srv: GC
    # time 0.34 -> 0.24 s, cli 0.15 -> 0.05 s in 5 s of 1 KiB GETs at -c32).
    gc.freeze()
    lines = daemon.HeldLinesWriter(logs.hold_lines())
    try:
        trio.run(main, lines, instruments=[lines])
    except BaseExceptionGroup as group:
        # One error out of the nurseries (a port we cannot bind, say) gets main()'s one line.
        sole = sole_exception(group)
        if sole is group:
            raise
        raise sole from None
    finally:
        logs.release_lines()


def _configure_logs(name: str, settings: ServerSettings | ClientSettings) -> None:
    logtargets.configure(name=name, level=settings.log_level, logfile=settings.logfile,
                   syslog_tag=settings.syslog, target=settings.log_target)


async def _stop_on_signal(log: logs.EventLogger, notifier: ServiceNotifier,
                          stop: Callable[[], None]) -> None:
    with trio.open_signal_receiver(*daemon.STOP_SIGNALS) as signals:
        async for signum in signals:
            log.info("Signal", signal=daemon.signal_name(signum))
            notifier.stopping()
            stop()
            return


def _reload(log: logs.EventLogger, notifier: ServiceNotifier, model: type[SettingsT],
            flags: dict[str, Any], apply: Callable[[SettingsT], tuple[list[str], list[str]]],
            name: str) -> None:
    """Re-read file and environment (flags still win); apply what can change; say what did."""
    notifier.reloading()
    try:
        settings = load_settings(model, flags)
    except ConfigError as exc:
        log.warning("Reload", err=str(exc).splitlines()[0], result="kept running settings")
        notifier.reloaded()
        return
    applied, restart_needed = apply(settings)
    if {"log_level", "logfile", "syslog", "log_target"} & set(applied):
        _configure_logs(name, settings)
    log.info("Reload", changed=",".join(applied) or "nothing",
             restart_needed=",".join(restart_needed) or None)
    notifier.reloaded()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    usage = f"usage: wstunnel {{{'|'.join(COMMANDS)}}} [flags]  (wstunnel srv -help for the flags)"
    if not args or args[0] in ("-h", "-help", "--help", "help"):
        print(usage)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    try:
        if command == "version":
            print(__version__)
            return 0
        if command == "srv":
            return run_server(rest)
        if command == "cli":
            return run_client(rest)
        if command in OPS_COMMANDS:
            return run_ops(command, rest)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            print(f"wstunnel {command}: {line}", file=sys.stderr)
        return EX_CONFIG
    except DialError as exc:
        print(f"wstunnel {command}: {exc}", file=sys.stderr)
        return EX_CONFIG
    except OSError as exc:
        print(f"wstunnel {command}: {exc}", file=sys.stderr)
        return 1
    print(f"wstunnel: unknown command {command!r}\n{usage}", file=sys.stderr)
    return 2
