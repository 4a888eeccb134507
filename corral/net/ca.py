"""A per-sandbox certificate authority for the egress proxy's secret-injecting TLS interception.

Each sandbox trusts exactly one extra CA, its own, installed in its trust store. The egress proxy
uses it to present a certificate for a host a secret is bound to, so that it can read the
sandbox's requests to that host and swap placeholders for real values.

Design:

* **The key is derived, never stored.** The P-256 private key is a deterministic function of a
  32-byte server secret (the seed), so the database keeps only the certificate; after a restart
  :meth:`SandboxCA.load` derives the same key again and checks it against the stored
  certificate. No accessor returns the key in any serialized form, and it never enters the
  sandbox.
* **Name constraints.** The CA certificate carries critical NameConstraints permitting only the
  DNS subtrees of the hosts bound to the sandbox's secrets (and excluding every IP address), so
  even someone holding the key could not make the sandbox's clients trust it for any other name.
  OpenSSL (Python, curl, Node) enforces this on trust anchors. A binding ``*.example.com``
  permits the ``example.com`` subtree; ``api.x.com`` permits ``api.x.com`` (X.509 subtrees always
  include subdomains; the proxy itself only ever mints leaves for bound names).
* **Validity.** The CA is valid from an hour ago (clock skew between host and guest) for ten
  years by default: a sandbox can outlive any shorter span (paused, hibernated, timeouts
  extended), a trust anchor cannot be replaced inside a running sandbox, and its lifetime buys
  an attacker nothing given the two points above. Leaves are short (7 days), made fresh per
  host on demand and replaced a day before they expire; each has its own fresh key.
* **Loading keys into ``ssl``.** ``SSLContext.load_cert_chain`` only reads files; the leaf chain
  and key are handed to it through an anonymous in-memory file (``memfd``), so no key is ever
  written to a disk.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import ipaddress
import os
import ssl
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from corral.net.sniff import is_ip_literal, normalize_name

__all__ = ["SandboxCA", "permitted_subtree"]

_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_KEY_CONTEXT = b"corral sandbox CA key v1\x00"
_CA_VALIDITY = dt.timedelta(days=3650)
_LEAF_VALIDITY = dt.timedelta(days=7)
_LEAF_RENEW = dt.timedelta(days=1)  # a cached leaf with less left than this is replaced
_BACKDATE = dt.timedelta(hours=1)
_CACHE_SIZE = 256
_CN_PREFIX = "corral sandbox CA "
_MAX_CN = 64  # ub-common-name (RFC 5280)


def _derive_key(seed_key: bytes) -> ec.EllipticCurvePrivateKey:
    if len(seed_key) < 32:
        raise ValueError("the CA seed must be at least 32 bytes")
    # SHA-512 with a context label: the seed may serve other derivations too, and reducing a
    # 512-bit number modulo the 256-bit group order leaves no measurable bias.
    digest = hashlib.sha512(_KEY_CONTEXT + seed_key).digest()
    scalar = int.from_bytes(digest, "big") % (_P256_ORDER - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP256R1())


def permitted_subtree(binding: str) -> str:
    """The DNS subtree a host binding needs: ``*.example.com`` → ``example.com``.

    ValueError for ``*``, IP literals and anything that is not a plain DNS name.
    """
    name = binding.strip()
    if name.startswith("*."):
        name = name[2:]
    if is_ip_literal(name.strip("[]")):
        raise ValueError(f"{binding!r}: an IP address cannot be name-constrained to")
    try:
        return normalize_name(name)
    except ValueError as exc:
        raise ValueError(f"{binding!r} is not a host name: {exc}") from None


def _within(host: str, subtree: str) -> bool:
    return host == subtree or host.endswith("." + subtree)


def _minimal(subtrees: Sequence[str]) -> tuple[str, ...]:
    """Sorted subtrees without those another one already contains."""
    unique = sorted(set(subtrees), key=lambda s: (s.count("."), s))
    kept: list[str] = []
    for name in unique:
        if not any(_within(name, k) for k in kept):
            kept.append(name)
    return tuple(sorted(kept))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


@dataclass
class _Leaf:
    pem: bytes  # key, leaf certificate, CA certificate
    not_after: dt.datetime


class SandboxCA:
    """One sandbox's CA; build it with :meth:`create` or :meth:`load`."""

    def __init__(
        self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, *, _token: object = None
    ) -> None:
        if _token is not _CONSTRUCT:
            raise TypeError("use SandboxCA.create() or SandboxCA.load()")
        self._key = key
        self._cert = cert
        self._cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        self._ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        constraints = cert.extensions.get_extension_for_class(x509.NameConstraints).value
        self._permitted = tuple(
            str(n.value)
            for n in constraints.permitted_subtrees or ()
            if isinstance(n, x509.DNSName)
        )
        self._lock = threading.Lock()
        self._leaves: OrderedDict[str, _Leaf] = OrderedDict()
        self._contexts: OrderedDict[tuple[str, tuple[str, ...]], tuple[ssl.SSLContext, _Leaf]] = (
            OrderedDict()
        )

    def __repr__(self) -> str:
        return f"SandboxCA({self._cert.subject.rfc4514_string()!r}, permitted={self._permitted})"

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(
        cls,
        seed_key: bytes,
        label: str,
        permitted: Sequence[str],
        *,
        valid_for: dt.timedelta = _CA_VALIDITY,
    ) -> SandboxCA:
        """A new CA certificate for the key derived from ``seed_key``, named after ``label``
        (e.g. the sandbox id), constrained to the subtrees of the ``permitted`` host bindings."""
        if not permitted:
            raise ValueError("a sandbox CA needs at least one permitted host")
        subtrees = _minimal([permitted_subtree(p) for p in permitted])
        key = _derive_key(seed_key)
        cn = (_CN_PREFIX + label)[:_MAX_CN]
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "corral"),
                x509.NameAttribute(NameOID.COMMON_NAME, cn),
            ]
        )
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + valid_for)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
            .add_extension(
                x509.NameConstraints(
                    permitted_subtrees=[x509.DNSName(s) for s in subtrees],
                    # Without an iPAddress constraint, IP names would be unconstrained.
                    excluded_subtrees=[
                        x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")),
                        x509.IPAddress(ipaddress.ip_network("::/0")),
                    ],
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert, _token=_CONSTRUCT)

    @classmethod
    def load(cls, seed_key: bytes, cert_pem: bytes) -> SandboxCA:
        """The CA made earlier by :meth:`create` with the same seed (e.g. after a restart).

        ValueError when ``cert_pem`` is not such a CA certificate or was made with another key.
        """
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as exc:
            raise ValueError(f"not a PEM certificate: {exc}") from None
        key = _derive_key(seed_key)
        ours = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        theirs = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if ours != theirs:
            raise ValueError("the certificate does not belong to the key derived from this seed")
        try:
            basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
            cert.extensions.get_extension_for_class(x509.NameConstraints)
        except x509.ExtensionNotFound as exc:
            raise ValueError(f"not a sandbox CA certificate: {exc}") from None
        if not basic.ca:
            raise ValueError("not a CA certificate")
        return cls(key, cert, _token=_CONSTRUCT)

    # ------------------------------------------------------------------ public surface

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate (PEM), for the sandbox's trust store."""
        return self._cert_pem

    @property
    def permitted(self) -> tuple[str, ...]:
        """The DNS subtrees the CA's name constraints permit."""
        return self._permitted

    @property
    def not_after(self) -> dt.datetime:
        return self._cert.not_valid_after_utc

    def covers(self, host: str) -> bool:
        """Whether a leaf for ``host`` would pass the CA's name constraints."""
        try:
            name = normalize_name(host)
        except ValueError:
            return False
        return any(_within(name, p) for p in self._permitted)

    def server_context(self, host: str, alpn: Sequence[str]) -> ssl.SSLContext:
        """A TLS server context presenting a leaf certificate for ``host`` (chain: leaf, CA),
        offering ``alpn`` (none when empty), TLS 1.2 at least. ValueError when ``host`` is
        outside the name constraints (clients would refuse the leaf anyway)."""
        name = normalize_name(host)
        if not self.covers(name):
            raise ValueError(f"{host} is outside this sandbox CA's permitted names")
        key = (name, tuple(alpn))
        now = _now()
        with self._lock:
            cached = self._contexts.get(key)
            if cached is not None and cached[1].not_after - now > _LEAF_RENEW:
                self._contexts.move_to_end(key)
                return cached[0]
            leaf = self._leaf(name, now)
            ctx = _context(leaf.pem, key[1])
            self._contexts[key] = (ctx, leaf)
            self._contexts.move_to_end(key)
            while len(self._contexts) > _CACHE_SIZE:
                self._contexts.popitem(last=False)
            return ctx

    # ------------------------------------------------------------------ leaves

    def _leaf(self, host: str, now: dt.datetime) -> _Leaf:
        leaf = self._leaves.get(host)
        if leaf is not None and leaf.not_after - now > _LEAF_RENEW:
            self._leaves.move_to_end(host)
            return leaf
        leaf = self._issue(host, now)
        self._leaves[host] = leaf
        self._leaves.move_to_end(host)
        while len(self._leaves) > _CACHE_SIZE:
            self._leaves.popitem(last=False)
        return leaf

    def _issue(self, host: str, now: dt.datetime) -> _Leaf:
        key = ec.generate_private_key(ec.SECP256R1())
        not_after = min(now + _LEAF_VALIDITY, self.not_after)
        # A CN longer than 64 characters is invalid; then the subject is empty and the SAN
        # critical (RFC 5280 4.2.1.6). Clients match the SAN either way.
        short = len(host) <= _MAX_CN
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)] if short else [])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=not short)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ski),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        pem = (
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            + cert.public_bytes(serialization.Encoding.PEM)
            + self._cert_pem
        )
        return _Leaf(pem, not_after)


_CONSTRUCT = object()


def _context(chain_pem: bytes, alpn: tuple[str, ...]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # A client-started renegotiation would make writes need reads, which the relay never does.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    _load_chain(ctx, chain_pem)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def _load_chain(ctx: ssl.SSLContext, pem: bytes) -> None:
    """``ctx.load_cert_chain`` from memory: through a memfd, or a private temporary file where
    memfd_create is missing."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None and os.path.isdir("/proc/self/fd"):
        fd = memfd_create("corral-leaf", os.MFD_CLOEXEC)
        try:
            _write_all(fd, pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="corral-leaf-") as tmp:  # mode 0700
        path = os.path.join(tmp, "chain.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, pem)
        finally:
            os.close(fd)
        try:
            ctx.load_cert_chain(path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
