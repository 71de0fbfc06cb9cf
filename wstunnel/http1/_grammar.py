"""HTTP/1.1's head grammar (RFC 9110 §5, RFC 9112 §3-5) as regular expressions over bytes, held to
exactly what h11 accepts, so that a head our fast paths take is one h11 would take too.

Where h11 is more lenient than the RFC, we follow h11 (the HTTP front and the fallbacks are
h11): a field value may hold any byte but NUL and whitespace between its blanks (RFC 9110 allows
VCHAR and obs-text only, no control characters), and a status line may leave out its reason
phrase and the space before it.
"""

from __future__ import annotations

import re

# RFC 9110 §5.6.2: token = 1*tchar.
TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
# RFC 9110 §5.6.3: optional whitespace.
OWS = rb"[ \t]*"
# RFC 5234 VCHAR: a request target is made of these.
VCHAR = rb"[\x21-\x7e]"
# A byte of a field value other than its inner blanks (h11's reading of field-vchar).
FIELD_VCHAR = rb"[^\x00\s]"
# RFC 9110 §5.5: field-value = *field-content, blanks only between visible runs.
FIELD_VALUE = rb"(?:" + FIELD_VCHAR + rb"+(?:[ \t]+" + FIELD_VCHAR + rb"+)*)?"
# RFC 9112 §5.1: field-line = field-name ":" OWS field-value OWS.
FIELD_LINE = TOKEN + rb":" + OWS + FIELD_VALUE + OWS
HTTP_VERSION = rb"HTTP/([0-9]\.[0-9])"
# RFC 9112 §3: request-line = method SP request-target SP HTTP-version.
REQUEST_LINE = rb"(" + TOKEN + rb") (" + VCHAR + rb"+) " + HTTP_VERSION
# A FIELD_VCHAR or a blank, as one class: a regex matches a run of these twice as fast as a run
# of either one (an alternation). tests/test_http1.py holds it to FIELD_VCHAR.
FIELD_TEXT = rb"[^\x00\n\r\x0b\x0c]"
# RFC 9112 §4: status-line = HTTP-version SP status-code SP [ reason-phrase ].
STATUS_LINE = HTTP_VERSION + rb" ([0-9]{3})(?: (" + FIELD_TEXT + rb"*))?"

TOKEN_RE = re.compile(TOKEN)
TARGET_RE = re.compile(VCHAR + rb"+")
FIELD_VALUE_RE = re.compile(FIELD_VALUE)
REQUEST_LINE_RE = re.compile(REQUEST_LINE)
STATUS_LINE_RE = re.compile(STATUS_LINE)
# Every field line of a head at once, each ending with CRLF: one regex call for the block
# instead of one per line. (A bare CR or LF, or a folded line, cannot match.)
# After the colon, FIELD_LINE's OWS FIELD_VALUE OWS matches any run of FIELD_TEXT (the blanks
# at either end are the OWS, those between runs the value's own): said so, the block regex does
# the same check in half the time (1.0 µs instead of 1.8 for a 7-line response block, and each
# request crosses seven blocks in its two daemons). tests/test_http1.py holds it to FIELD_LINE.
FIELD_BLOCK_RE = re.compile(rb"(?:" + TOKEN + rb":" + FIELD_TEXT + rb"*\r\n)*")
# RFC 9110 §8.6: Content-Length = 1*DIGIT; h11 refuses more than 20 digits.
CONTENT_LENGTH_RE = re.compile(rb"[0-9]{1,20}")
