"""Protocol v2: streamed, multiplexed HTTP with flow control over one tunnel, sans-I/O.

Bytes in, events out; calls in, frames out. No sockets and no tasks here: the trio side that
drives a ``V2Connection`` for either end is ``wstunnel.tunnel.endpoint``. The wire format, with
its rules and rationale, is specified in docs/protocol-v2.md.

Inside: ``_frames`` (frame types, limits, the frame and batch codecs), ``_heads`` (HEAD and END
payloads: HTTP/1.1 heads and trailers), ``_events`` (what the connection reports),
``_state`` (one stream's state), ``_connection`` (``V2Connection``: its streams and the
windows), ``_tuning`` (windows that
follow the link) and ``_opening`` (what the two ends agree on as a tunnel opens). Import from
this package only.
"""

from wstunnel.framing import MAX_HEAD_SIZE
from wstunnel.v2 import _connection, _events, _frames, _heads, _opening, _state, _tuning
from wstunnel.v2._connection import *
from wstunnel.v2._events import *
from wstunnel.v2._frames import *
from wstunnel.v2._heads import *
from wstunnel.v2._opening import *
from wstunnel.v2._state import *
from wstunnel.v2._tuning import *

__all__ = ["MAX_HEAD_SIZE", *_frames.__all__, *_heads.__all__, *_events.__all__, *_connection.__all__,
           *_state.__all__, *_tuning.__all__, *_opening.__all__]
