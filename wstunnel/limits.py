"""The process's open-file limit: raised at start to all the service manager allows, and counted.

Every tunnel and every HTTP connection is a socket, so a file descriptor. systemd starts a service
with a soft limit of 1,024 open files whatever hard limit ``LimitNOFILE=`` grants (so that old
programs using select() keep working), and leaves raising it to the program; Go's runtime does it
by itself since Go 1.19, nginx has ``worker_rlimit_nofile``. Our daemons raise theirs to the hard
limit before they open anything (trio waits with epoll: no select() here, so no 1,024 ceiling),
and log what they run with. The units set the hard limit for the documented capacity.

Counting them (``wstunnel.procstats.open_fds``) lists ``/proc/self/fd``: a system call and a few
microseconds per hundred descriptors. The server counts its connections itself and lists them
only every so often, to catch what it does not count (see ``wstunnel.server.capacity``).
"""

from __future__ import annotations

import contextlib
import errno
import resource
from dataclasses import dataclass
from pathlib import Path

# accept(2), socket(2) and open(2) fail with these when descriptors (ours, or the system's) or
# the kernel memory for one run out; trio.serve_listeners treats the same four as "overloaded".
OUT_OF_FILES_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Linux never has more than fs.nr_open (1,048,576 by default) descriptors per process; a hard
# limit reported as unlimited is raised to that, not to infinity, which setrlimit refuses.
NR_OPEN = Path("/proc/sys/fs/nr_open")
SOMAXCONN = Path("/proc/sys/net/core/somaxconn")


@dataclass(frozen=True)
class OpenFilesLimit:
    soft: int  # what the process runs with now
    hard: int
    started_with: int  # the soft limit before we raised it

    @property
    def raised(self) -> bool:
        return self.soft > self.started_with


def raise_open_files_limit() -> OpenFilesLimit:
    """Raise the soft RLIMIT_NOFILE to the hard limit; what we run with afterwards.

    A failure (a hard limit lowered meanwhile, a sandbox that forbids setrlimit) keeps the limit
    the process has, which the caller logs: the daemon then refuses work early at that limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else _nr_open()
    if soft != resource.RLIM_INFINITY and soft < target:
        # Refused (a sandbox, a hard limit lowered meanwhile): the caller logs what we have.
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return OpenFilesLimit(soft=_finite(now), hard=_finite(hard), started_with=_finite(soft))


def soft_open_files_limit() -> int:
    """The limit the process runs with (never infinite on Linux, but said so in a number)."""
    return _finite(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def listen_backlog() -> int | None:
    """The kernel's cap on a listening socket's queue of connections not accepted yet.

    trio asks listen() for 65,535 and the kernel silently takes net.core.somaxconn (4,096 on
    Debian 12) instead; None where /proc/sys cannot be read.
    """
    try:
        return int(SOMAXCONN.read_text().strip())
    except (OSError, ValueError):
        return None


def out_of_files(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it was raised from (trio.open_tcp_stream reports each failed
    attempt in an ExceptionGroup under a plain OSError), says descriptors ran out."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        error = pending.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in OUT_OF_FILES_ERRNOS:
            return True
        if isinstance(error, BaseExceptionGroup):
            pending.extend(error.exceptions)
        for linked in (error.__cause__, error.__context__):
            if linked is not None:
                pending.append(linked)
    return False


def _nr_open() -> int:
    try:
        return int(NR_OPEN.read_text().strip())
    except (OSError, ValueError):
        return 1024 * 1024


def _finite(value: int) -> int:
    return _nr_open() if value == resource.RLIM_INFINITY else value
