"""srv's own TLS: the handshake of each connection on the TLS listener, and the certificate that a
reload swaps in.

Each new connection takes the context current at its accept, and keeps it: a reload (SIGHUP,
``systemctl reload``) builds a new context from the files, which new connections get, while the
connections and tunnels already open go on undisturbed with theirs. A file that cannot be loaded
at reload is logged and the running certificate stays.
"""

from __future__ import annotations

import ssl

import trio

from wstunnel import tls
from wstunnel.config import ServerSettings
from wstunnel.logs import EventLogger


class TLSFront:
    def __init__(self, settings: ServerSettings, log: EventLogger) -> None:
        assert settings.tls_cert is not None and settings.tls_key is not None
        self.log = log
        self.handshake_timeout = settings.header_timeout
        self.context = self._load(settings)
        self.fingerprint = tls.fingerprint(settings.tls_cert)
        log.info("TLS   CERT", cert=settings.tls_cert, sha256=self.fingerprint,
                 client_ca=settings.tls_client_ca)

    @staticmethod
    def _load(settings: ServerSettings) -> ssl.SSLContext:
        assert settings.tls_cert is not None and settings.tls_key is not None
        return tls.server_context(settings.tls_cert, settings.tls_key, settings.tls_client_ca)

    def reload(self, settings: ServerSettings) -> None:
        """Read the files again (a renewed certificate has the same paths): new connections get
        them; a file that will not load leaves the running certificate in place."""
        self.handshake_timeout = settings.header_timeout
        try:
            context = self._load(settings)
            fingerprint = tls.fingerprint(settings.tls_cert) if settings.tls_cert else ""
        except (tls.TLSFileError, OSError) as exc:
            self.log.warning("TLS   CERT", err=str(exc), result="kept the running certificate")
            return
        renewed = fingerprint != self.fingerprint
        self.context, self.fingerprint = context, fingerprint
        self.log.info("TLS   CERT", cert=settings.tls_cert, sha256=fingerprint,
                      renewed="yes" if renewed else "no", client_ca=settings.tls_client_ca)

    async def handshake(self, stream: trio.SocketStream,
                        peer: str) -> tuple[trio.SSLStream[trio.SocketStream], str | None] | None:
        """The connection's TLS stream and its client certificate's verified subject (None if
        it presented none); None if the handshake failed or took longer than header_timeout."""
        secure = trio.SSLStream(stream, self.context, server_side=True, https_compatible=True)
        with trio.move_on_after(self.handshake_timeout) as waited:
            try:
                await secure.do_handshake()
            except trio.BrokenResourceError as exc:
                reason = _reason(exc)
                # A client certificate refused is worth an operator's eye; scanners and clients
                # that hang up mid-handshake are not.
                if "certificate" in reason.lower():
                    self.log.warning("TLS   REFUSE", addr=peer, err=reason)
                else:
                    self.log.debug("TLS   REFUSE", addr=peer, err=reason)
                await trio.aclose_forcefully(stream)
                return None
        if waited.cancelled_caught:
            self.log.debug("TLS   REFUSE", addr=peer, err="handshake timed out")
            await trio.aclose_forcefully(stream)
            return None
        certificate = secure.getpeercert()
        return secure, tls.subject_text(certificate) if certificate else None


def _reason(exc: BaseException) -> str:
    # trio keeps the SSL error (e.g. "certificate verify failed") in __cause__.
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLError):
        return str(cause.reason or cause)
    return str(cause or exc or "connection lost")
