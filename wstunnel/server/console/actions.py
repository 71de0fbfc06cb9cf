"""What an operator can do from the console: disconnect a tunnel's clients, block and unblock a
token, start a drain. Each is logged with who did it (address, and how the console let them in).

- **Disconnect** closes every connection of the token (WebSocket Close 1012, "service restart";
  a long-poll session ends): the clients redial after their backoff, as after any lost tunnel.
  Requests in flight are retried or failed as for any lost tunnel.
- **Block** saves the token in the block list first (nothing changes if that fails), then
  answers everything waiting for it with 403 and closes its connections (Close 1008, policy);
  from then on its handshakes get 403 and so do its requests, across restarts.
- **Unblock** takes it off the list; its clients get in again at their next redial.
- **Drain** is the first half of a graceful stop, without the stop: no new tunnels and no new
  requests for tokens (503 with Retry-After), requests in flight get ``shutdown_grace`` to
  finish, then every tunnel is closed (1001) so its client redials, elsewhere if a balancer
  sends it there. The console and the status endpoints keep answering; a restart ends the drain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from wstunnel.logs import EventLogger
from wstunnel.server.blocklist import BlockedToken, Blocklist
from wstunnel.server.rendezvous import Failure, Registry, Rendezvous

BLOCKED_FAILURE = Failure(403, "Token blocked on this server")


@dataclass(eq=False)
class Actions:
    registry: Registry
    blocklist: Blocklist
    log: EventLogger
    start_drain: Callable[[], bool] = field(kw_only=True)  # False if draining already

    async def disconnect(self, rendezvous: Rendezvous, who: str) -> int:
        """Close the token's connections; how many there were."""
        connections = list(rendezvous.connections)
        self.log.warning("ADMIN DISCONNECT", token=rendezvous.token, clients=len(connections),
                         by=who)
        async with trio.open_nursery() as closers:
            for connection in connections:
                closers.start_soon(connection.close, 1012, "disconnected by an operator")
        return len(connections)

    async def block(self, rendezvous: Rendezvous, who: str) -> BlockedToken:
        """Block the token (saved first: OSError, and nothing changed, if it cannot be)."""
        entry = await self.blocklist.block(rendezvous.token, who)
        rendezvous.blocked = True
        rendezvous.touch()  # the feed sends the tunnel's row again
        connections = list(rendezvous.connections)
        self.log.warning("ADMIN BLOCK", token=rendezvous.token, clients=len(connections), by=who)
        rendezvous.fail_all(BLOCKED_FAILURE)
        async with trio.open_nursery() as closers:
            for connection in connections:
                closers.start_soon(connection.close, 1008, "token blocked")
        return entry

    async def unblock(self, fingerprint: str, who: str,
                      rendezvous: Rendezvous | None) -> BlockedToken | None:
        """Unblock (saved first); the entry, or None if the token was not blocked."""
        entry = await self.blocklist.unblock(fingerprint)
        if entry is None:
            return None
        if rendezvous is not None:
            rendezvous.blocked = False
            rendezvous.touch()
        self.log.warning("ADMIN UNBLOCK", token=entry.token, by=who)
        return entry

    def drain(self, who: str) -> bool:
        """Start draining; False if the server was draining already."""
        started = self.start_drain()
        self.log.warning("ADMIN DRAIN", by=who, result="started" if started else "already draining")
        return started
