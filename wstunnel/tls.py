"""TLS files and contexts of both daemons: srv's own HTTPS listener and the client certificates.

srv speaks TLS 1.2 and 1.3 only, with ALPN ``http/1.1`` (its front speaks nothing else), and, when
``tls_client_ca`` is set, asks every client for a certificate signed by that CA: one that is
presented must verify (else the handshake fails), one that is not is allowed at the TLS layer and
refused where ``require_client_cert`` says so, with an HTTP answer the client can read.

Errors are :class:`TLSFileError` (a ValueError, so a settings validator reports it under the key,
with the file it came from) and name the file at fault, never its content.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import stat
from pathlib import Path
from typing import Any

# TLS 1.2 suites: AEAD with forward secrecy only, as the shipped nginx files have them (TLS 1.3
# has only such suites, and OpenSSL picks among them itself).
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
ALPN = ["http/1.1"]

# RFC 4514 short names of the attributes a client certificate's subject usually has; others
# keep the long name Python gives them (as OpenSSL prints emailAddress).
_SHORT_NAMES = {
    "commonName": "CN", "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST",
    "organizationName": "O", "organizationalUnitName": "OU", "streetAddress": "STREET",
    "domainComponent": "DC", "userId": "UID",
}


class TLSFileError(ValueError):
    """A certificate, key or CA file we cannot use; the message names the file."""


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TLSFileError(f"cannot read {path}: {exc.strerror or exc}") from None


def check_certificate_file(path: Path) -> None:
    """``path`` holds at least one PEM certificate."""
    if b"-----BEGIN CERTIFICATE-----" not in _read(path):
        raise TLSFileError(f"{path} holds no PEM certificate")


def check_private_file(path: Path) -> None:
    """A private key must not be readable by other users (ssh refuses such keys too)."""
    if b"PRIVATE KEY-----" not in _read(path):
        raise TLSFileError(f"{path} holds no PEM private key")
    mode = path.stat().st_mode
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise TLSFileError(f"{path} is readable by other users (mode {stat.S_IMODE(mode):04o}); "
                           "chmod 640 it")


def load_chain(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    """``cert`` (a chain, leaf first) and its ``key`` into ``context``."""
    check_certificate_file(cert)
    check_private_file(key)
    try:
        context.load_cert_chain(certfile=os.fspath(cert), keyfile=os.fspath(key))
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or exc.reason == "KEY_VALUES_MISMATCH":
            raise TLSFileError(f"the key in {key} does not match the certificate in {cert}") from None
        raise TLSFileError(f"cannot load {cert} with {key}: {exc.reason or exc}") from None


def load_client_ca(context: ssl.SSLContext, ca: Path) -> None:
    check_certificate_file(ca)
    try:
        context.load_verify_locations(cafile=os.fspath(ca))
    except ssl.SSLError as exc:
        raise TLSFileError(f"no usable CA certificate in {ca}: {exc.reason or exc}") from None


def check_client_ca(ca: Path) -> None:
    load_client_ca(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), ca)


def client_context(cert: Path | None = None, key: Path | None = None, *,
                   cafile: Path | None = None, insecure: bool = False) -> ssl.SSLContext:
    """A client's context: the system's CAs (and ``cafile``'s), TLS 1.2 at least, and the
    certificate to present when the server asks for one."""
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cafile is not None:
        try:
            context.load_verify_locations(cafile=os.fspath(cafile))
        except (OSError, ssl.SSLError) as exc:
            raise TLSFileError(f"cannot load CA file {cafile}: {exc}") from None
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert is not None and key is not None:
        load_chain(context, cert, key)
    return context


def server_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """srv's context: TLS 1.2 and 1.3, AEAD suites, ALPN http/1.1, client certificates asked
    for (and verified when presented) if ``client_ca`` is given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.set_ciphers(TLS12_CIPHERS)
    # Ticket keys live as long as the process and are never rotated: resumption through the
    # session cache instead, as the nginx files do it (ssl_session_tickets off).
    context.options |= ssl.OP_NO_TICKET
    context.set_alpn_protocols(ALPN)
    load_chain(context, cert, key)
    if client_ca is not None:
        load_client_ca(context, client_ca)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def fingerprint(cert: Path) -> str:
    """SHA-256 of the first certificate of ``cert`` (the leaf), 16 hex digits: what a log line
    shows to tell a renewed certificate from the one before."""
    text = _read(cert).decode("ascii", "replace")
    start = text.find("-----BEGIN CERTIFICATE-----")
    end = text.find("-----END CERTIFICATE-----", start)
    if start < 0 or end < 0:
        raise TLSFileError(f"{cert} holds no PEM certificate")
    der = ssl.PEM_cert_to_DER_cert(text[start:end + len("-----END CERTIFICATE-----")])
    return hashlib.sha256(der).hexdigest()[:16]


def subject_text(peercert: dict[str, Any]) -> str | None:
    """A verified peer certificate's subject as RFC 4514 text (``CN=client,O=Example``, the most
    specific part first), the form nginx's ``$ssl_client_s_dn`` has; None if it has none."""
    rdns = peercert.get("subject") or ()
    parts = []
    for rdn in reversed(rdns):
        parts.append("+".join(f"{_SHORT_NAMES.get(name, name)}={_escape(str(value))}"
                              for name, value in rdn))
    return ",".join(parts) or None


def _escape(value: str) -> str:
    escaped = "".join("\\" + ch if ch in ',+"\\<>;=' else ch for ch in value)
    if escaped.startswith(("#", " ")):
        escaped = "\\" + escaped
    if escaped.endswith(" "):
        escaped = escaped[:-1] + "\\ "
    return escaped
