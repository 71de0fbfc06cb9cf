"""Encoded v2 frames on their way to the transport: one writer, in order, batched when it can be."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import trio

from wstunnel import v2
from wstunnel.tunnel.transport import ConnectionClosed, MessageTransport

# A batch's worth of frames: once this many wait, the task that put the last of them sends them
# (send_early) rather than leave them for the writer's next turn. trio runs a woken writer only
# after every task already runnable has had its turn; with 32 requests in flight those turns took
# milliseconds, every finished response waited through them, and the other daemon sat idle in the
# meantime: the two worked in lockstep. Paired runs at -c32 (wrk, 1 KiB): 2 frames: no gain
# (more, smaller messages); 8: +15 %; 16 and 32: +25-45 %, 32 with the least CPU per request.
EARLY_SEND_FRAMES = 32
# A tunnel that has sent nothing for this long is not busy: the frames a task puts then go at once
# from that task (send_early) instead of waiting for others to join them. Batches pay on a busy
# loop; on a quiet one they only delay, and across a long link they formed a convoy: at -c32 over
# a 50 ms round trip (bench --link-delay 25, 3 rounds) the requests reached srv in bunches, left
# in one message and came back as a bunch, each waiting for the bunch's work on both ends at
# every round trip: 550 req/s, p50 57.5 ms, where the direct path made 590 and 53.8 (the
# original: 594 and 53.1). With this: 586 req/s, p50 54.0. On loopback, where the loop is busy,
# it changed nothing (-c32 5,961 -> 6,112 req/s, -c128 6,976 -> 6,946), while sending every
# request's frames at once lost 8 % there (5,462 and 6,485).
EARLY_SEND_IDLE = 0.0005
# ... but only in a process with time to spare. On loopback at -c32 the tunnel went quiet for
# 0.5 ms at a time while its peer worked through a batch (the two take turns), and sending the
# next requests' frames on their own then cost 6 % (6,649 -> 6,266 req/s, srv 115 -> 129 µs a
# request). There the daemons use ~80 % of a core; across the long link ~14 %. A process busier
# than this share of a core over the last LOAD_WINDOW keeps batching: on loopback -c32 then
# 6,859 req/s, srv 113 µs (without the share: 5,966, 137 µs; with no idle rule at all: 5,985,
# 128 µs; 3 rounds); across the link -c32 581 req/s, -c128 2,280 (without: 575, 2,268).
BUSY_SHARE = 0.5
LOAD_WINDOW = 0.05
# Body bytes waiting here beyond which a sender of DATA waits (``wait_room``) until the writer
# has taken them down to half. The peer's windows may allow far more (tens of MiB on a long
# link), but bytes queued here are only late: a small response's frames would wait behind them
# (a full tunnel window of a bulk transfer: seconds), two transfers would not interleave, and
# memory would grow with the window instead of staying with the socket. Two batched messages'
# worth keeps the writer busy while senders refill.
BACKLOG_HIGH_WATER = v2.MAX_BATCH_SIZE // 2


class ProcessLoad:
    """The share of a core the process used over its last LOAD_WINDOW (or longer, between calls
    far apart): CPU time over wall time, read only when asked. One per process: its event loop
    is what is busy or not."""

    def __init__(self, wall: Callable[[], float] = time.perf_counter,
                 cpu: Callable[[], float] = time.process_time) -> None:
        self._wall = wall
        self._cpu = cpu
        self._at = wall()
        self._used = cpu()
        self.share = 0.0

    def __call__(self) -> float:
        now = self._wall()
        elapsed = now - self._at
        if elapsed >= LOAD_WINDOW:
            used = self._cpu()
            self.share = (used - self._used) / elapsed
            self._at, self._used = now, used
        return self.share


PROCESS_LOAD = ProcessLoad()


class FrameOutbox:
    """Encoded v2 frames on their way to the transport, in the order they were put.

    ``put`` never waits (framing_v2's ordering rule: a frame goes out right after the V2Connection
    call that made it, with no checkpoint between); one writer task (``pump``) sends them as
    messages (``next_message``): one frame a message, or, on a batching tunnel, every frame
    waiting (up to MAX_BATCH_SIZE) in one message, or a batch's worth sent early by the task that
    filled it (``send_early``). One message is on its way at a time, so they leave in the order
    taken. ``put`` never refuses: senders of DATA keep the backlog near BACKLOG_HIGH_WATER by
    waiting for ``wait_room`` first; heads, WINDOW and RESET are small.
    """

    def __init__(self, *, batched: bool, clock: Callable[[], float] = time.perf_counter,
                 load: Callable[[], float] = PROCESS_LOAD) -> None:
        self.batched = batched
        # A plain clock, not trio's: read at every send_early, and only differences matter.
        self._clock = clock
        self._load = load
        self._last_sent = clock()  # when the last message started on its way
        self._frames: deque[bytes] = deque()
        self._closed = False
        self._sending = False  # a message is on its way (the writer's or an early one)
        self._ready = trio.lowlevel.ParkingLot()
        self._backlog = 0  # bytes of the frames waiting
        self._room = trio.lowlevel.ParkingLot()  # senders waiting for the backlog to shrink
        # The task whose frames do not wake the writer (``hold``), until its ``send_early``.
        self._holder: trio.lowlevel.Task | None = None
        # The shield of an early send under way: ``abort`` lifts it, and allows no more.
        self._early: trio.CancelScope | None = None
        self._aborted = False

    @property
    def backlog(self) -> int:
        return self._backlog

    def put(self, frame: bytes) -> None:
        if self._closed:
            return  # the tunnel is gone: so is everything we would have said
        self._frames.append(frame)
        self._backlog += len(frame)
        if self._ready and (self._holder is None or self._holder is not trio.lowlevel.current_task()):
            self._ready.unpark()

    def hold(self) -> None:
        """The frames this task puts from now on do not wake the writer: the task sends them
        itself (``send_early``) or hands them to the writer (``release``) before its next
        checkpoint. A writer woken only to find its frames gone costs a pass of the scheduler,
        per request when requests come one at a time. Other tasks' frames wake it as ever."""
        self._holder = trio.lowlevel.current_task()

    def release(self) -> None:
        """End a ``hold``: the writer takes what waits."""
        if self._holder is not None:
            self._holder = None
            if self._frames and self._ready:
                self._ready.unpark()

    async def wait_room(self) -> None:
        """Until the backlog is below BACKLOG_HIGH_WATER (at once if it is; never once closed)."""
        while self._backlog > BACKLOG_HIGH_WATER and not self._closed:
            await self._room.park()

    def close(self) -> None:
        """No more frames; the writer still gets those already put, then None."""
        self._closed = True
        self._ready.unpark_all()
        self._room.unpark_all()

    def abort(self) -> None:
        """The tunnel is over: ``close``, and end an early send under way despite its shield.

        The shield keeps a request's cancellation from cutting a message in half while the
        tunnel lives. Once it is over, a send to a link that went silent would wait for room
        until the kernel gives up on the connection (many minutes), and hold its task, and the
        nursery that waits for that task, all that time."""
        self.close()
        # Nobody will send what waits: let it go now, not when the tunnel's last reference does
        # (a dead tunnel's frames, up to its peer's windows, held until a garbage collection).
        self._frames.clear()
        self._backlog = 0
        self._aborted = True  # the handlers' last sends, in their finally clauses, come after
        if self._early is not None:
            self._early.cancel()

    async def pump(self, transport: MessageTransport) -> None:
        """The writer task: send what is put, in order, until closed (or the transport is)."""
        while (message := await self.next_message()) is not None:
            if not await self._send(transport, message):
                return  # the receive loop sees the close too, and ends the tunnel

    async def send_early(self, transport: MessageTransport, *, quiet: bool = False) -> None:
        """Called by a task that has just put frames: if a batch's worth waits (or anything, on
        a ``quiet`` tunnel or after a quiet spell: ``_idle``) and no message is on its way, send
        it from here, now, instead of waking the writer for it; ends a ``hold``. Shielded: a send
        cut short would leave part of a message on the wire and break the tunnel for everyone.

        Quiet: the caller's is the only request in flight, so nothing would join its frames in
        a batch if they waited for the writer; with many in flight they wait and go together,
        unless the tunnel was idle."""
        frames = self._frames
        if frames and not self._sending and not self._aborted and (
                quiet or (self.batched and (len(frames) >= EARLY_SEND_FRAMES or self._idle()))):
            self._holder = None  # what _send leaves behind wakes the writer
            with trio.CancelScope(shield=True) as self._early:
                try:
                    await self._send(transport, self._take())
                finally:
                    self._early = None
            return
        self.release()

    def _idle(self) -> bool:
        """Nothing sent for EARLY_SEND_IDLE, in a process with time to spare (BUSY_SHARE)."""
        return self._clock() - self._last_sent >= EARLY_SEND_IDLE and self._load() < BUSY_SHARE

    async def next_message(self) -> bytes | None:
        """The next message to send, waiting for a frame; None once closed and drained."""
        frames = self._frames
        while not frames or self._sending:
            if self._closed and not frames:
                return None
            await self._ready.park()
        return self._take()

    async def _send(self, transport: MessageTransport, message: bytes) -> bool:
        """Send ``message``; False if the transport has closed."""
        self._sending = True
        self._last_sent = self._clock()
        try:
            await transport.send_message(message)
        except ConnectionClosed:
            return False
        finally:
            self._sending = False
            if self._frames and self._ready:
                self._ready.unpark()  # the writer, waiting for our message to be on its way
        return True

    def _take(self) -> bytes:
        frames = self._frames
        if not self.batched:
            frame = frames.popleft()
            self._taken(len(frame))
            return frame
        batch = [frames.popleft()]
        size = len(batch[0]) + v2.BATCH_ENTRY_OVERHEAD
        while frames and size + len(frames[0]) + v2.BATCH_ENTRY_OVERHEAD <= v2.MAX_BATCH_SIZE:
            batch.append(frames.popleft())
            size += len(batch[-1]) + v2.BATCH_ENTRY_OVERHEAD
        self._taken(size - len(batch) * v2.BATCH_ENTRY_OVERHEAD)
        return v2.pack_batch(batch)

    def _taken(self, size: int) -> None:
        self._backlog -= size
        if self._room and self._backlog <= BACKLOG_HIGH_WATER // 2:
            self._room.unpark_all()
