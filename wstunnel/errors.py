"""The exception hierarchy shared by every wstunnel module."""


class WStunnelError(Exception):
    """Base class of every error wstunnel raises on purpose."""


class ConfigError(WStunnelError):
    """A flag, environment variable or configuration file holds a value we cannot use."""


class FramingError(WStunnelError):
    """A tunnel message that does not follow the wire protocol."""


class TunnelMessageError(FramingError):
    """The message itself is unusable (too short, bad id, text): the peer is broken."""


class HttpPayloadError(FramingError):
    """The id is fine but the HTTP/1.1 request or response after it cannot be parsed."""


class DialError(WStunnelError):
    """Opening the tunnel's transport (TCP, proxy, TLS, WebSocket handshake) failed."""


class ProxyError(DialError):
    """The HTTP CONNECT proxy refused or broke the connection."""


class BackendError(WStunnelError):
    """Talking HTTP to the tunnel client's backend failed (wstunnel.client.origin).

    The subclasses keep the names httpx used for the same failures: they reach users in
    "Backend unreachable: ConnectError" answers and in the client's log.
    """


class InvalidURL(BackendError):
    """The backend URL (``-server`` or an allowed X-Host) is not an http:// or https:// URL we can use."""


class ConnectError(BackendError):
    """No connection to the backend: refused, no route, unknown host, TLS handshake or verification."""


class OutOfFiles(BackendError):
    """No descriptor for a backend connection: the tunnel client (or the system) is at its
    open-files limit. The backend is not at fault; the request can be retried later."""


class ReadError(BackendError):
    """The backend connection broke while we read from it."""


class WriteError(BackendError):
    """The backend connection broke while we wrote to it."""


class RemoteProtocolError(BackendError):
    """The backend broke HTTP/1.1: a malformed response, or it closed before the response ended."""


class LocalRequestError(BackendError):
    """The request cannot go out as HTTP/1.1 (h11 refused a header or target)."""


class BackendTimeout(BackendError):
    """The backend did not connect, accept bytes or send bytes in time, or no connection slot freed up."""


def sole_exception(exc: BaseException) -> BaseException:
    """The one real error inside nested single-member exception groups, or ``exc`` itself.

    trio wraps whatever leaves a nursery in an ExceptionGroup; a lone error is still one error
    and deserves its own message, not a group traceback.
    """
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class ProtocolError(TunnelMessageError):
    """A well-formed protocol v2 frame that breaks its rules (stream states, windows): the peer is broken.

    ``stream`` names the stream the frame was for, or is None for the whole tunnel.
    """

    def __init__(self, message: str, stream: int | None = None) -> None:
        super().__init__(message)
        self.stream = stream


class LocalProtocolError(WStunnelError):
    """We were about to send something protocol v2 does not allow in the stream's state: a bug here."""


class StreamClosedError(WStunnelError):
    """The stream can carry nothing more from us: we ended our side, or either side reset it.

    Not a bug: a reset from the peer can always overtake what we were about to send. ``code`` is the
    reset's error code when the stream was reset (and still remembered), else None.
    """

    def __init__(self, message: str, stream: int, code: int | None = None) -> None:
        super().__init__(message)
        self.stream = stream
        self.code = code
