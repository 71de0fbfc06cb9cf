"""libFuzzer-driven fuzzing of the tunnel framing (v1 and v2) with atheris.

    python tests/fuzz/fuzz_framing.py -runs=50000 [corpus_dir]

Every input must either parse or raise one of the framing module's own errors; anything else
(another exception, a hang, a crash) is a finding, and libFuzzer writes the input to a file.
The first input byte picks the target, the rest is the message.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

import atheris

from wstunnel import compiled

ROOT = Path(__file__).resolve().parents[2]


class _FromSource(importlib.abc.MetaPathFinder):
    """The modules the build compiles (wstunnel/compiled.py), imported from their source here:
    atheris instruments byte-code, so only the interpreted form gives it the coverage that guides
    it. The compiled form runs the same source, and the rest of the suite runs that."""

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in compiled.COMPILED_MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, ROOT / compiled.source_path(fullname))


sys.meta_path.insert(0, _FromSource())

with atheris.instrument_imports():
    from wstunnel import framing
    from wstunnel import v2 as framing_v2
    from wstunnel.errors import FramingError


def one_input(data: bytes) -> None:
    if not data:
        return
    target, message = data[0] % 5, data[1:]
    try:
        if target == 0:
            framing.split_message(message)
        elif target == 1:
            framing.parse_request(message)
        elif target == 2:
            framing.parse_response(message, request_method=b"GET")
        elif target == 3:
            framing_v2.decode_frame(message)
        else:
            # A client-side connection with one stream open, fed one arbitrary frame.
            server, client = framing_v2.V2Connection("server"), framing_v2.V2Connection("client")
            _stream, head = server.send_request(b"GET", b"/", [(b"Host", b"x")], end_stream=True)
            client.receive(framing_v2.encode_frame(head))
            client.receive(message)
    except FramingError:
        pass


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
