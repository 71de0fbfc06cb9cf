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


def sole_exception(exc: BaseException) -> BaseException:
    """The one real error inside nested single-member exception groups, or ``exc`` itself.

    trio wraps whatever leaves a nursery in an ExceptionGroup; a lone error is still one error
    and deserves its own message, not a group traceback.
    """
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
