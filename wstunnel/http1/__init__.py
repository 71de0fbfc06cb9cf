"""HTTP/1.1 heads, sans-I/O: the one codec for the heads we read or write ourselves, beside h11.

h11 reads and writes whole HTTP/1.1 conversations (the server's front, protocol v1's messages);
where a whole conversation is not needed, a head costs a few microseconds here instead of tens.
Those fast paths are the v2 tunnel's HEAD frames (``wstunnel.v2``), the backend client's request
heads and common responses (``wstunnel.client.origin``), protocol v1's messages and the server's
raw answers. The grammar is held to exactly what h11 accepts (tests/test_http1.py checks it
against h11 with generated heads), and a reader hands anything unusual to h11.

Inside: ``_grammar`` (the ABNF as regular expressions), ``_readers`` and ``_writers``.
"""

from wstunnel.http1._readers import (
    content_length,
    parse_fields,
    parse_request_line,
    parse_status_line,
    split_head,
)
from wstunnel.http1._writers import (
    HeadError,
    check_field,
    check_method,
    check_target,
    head_bytes,
    request_line,
    status_line,
)

__all__ = [
    "HeadError",
    "check_field",
    "check_method",
    "check_target",
    "content_length",
    "head_bytes",
    "parse_fields",
    "parse_request_line",
    "parse_status_line",
    "request_line",
    "split_head",
    "status_line",
]
