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
