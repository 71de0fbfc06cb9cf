"""Header helpers: what a proxy must not pass on."""

from __future__ import annotations

import pytest

from wstunnel.headers import Headers, without_hop_by_hop


@pytest.mark.parametrize("headers, extra, kept", [
    ([(b"Host", b"h"), (b"Connection", b"keep-alive"), (b"Keep-Alive", b"timeout=5")], (),
     [(b"Host", b"h")]),
    # Names listed in Connection go too, wherever they stand, in any case.
    ([(b"X-Foo", b"1"), (b"CONNECTION", b"close, x-foo ,X-Bar"), (b"x-bar", b"2"), (b"A", b"b")], (),
     [(b"A", b"b")]),
    ([(b"TE", b"trailers"), (b"Transfer-Encoding", b"chunked"), (b"Upgrade", b"h2c"),
      (b"Proxy-Authorization", b"x"), (b"Trailer", b"T"), (b"Proxy-Connection", b"k")], (), []),
    # Extra names (lowercase) are dropped as well; order and case of the rest stay.
    ([(b"X-Token", b"t"), (b"b", b"2"), (b"X-Host", b"h"), (b"a", b"1")], (b"x-token", b"x-host"),
     [(b"b", b"2"), (b"a", b"1")]),
    ([], (), []),
])
def test_without_hop_by_hop(headers: Headers, extra: tuple[bytes, ...], kept: Headers) -> None:
    assert without_hop_by_hop(headers, *extra) == kept
    assert without_hop_by_hop(iter(headers), *extra) == kept  # any iterable
