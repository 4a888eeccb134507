"""A sandbox CA is re-derivable from its seed, issues leaves that Python, OpenSSL, curl and Node
accept, and its name constraints make those clients refuse any leaf for another name."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import os
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from corral.net.ca import SandboxCA, permitted_subtree

HOST = "api.x.test"
SEED = bytes(range(32))


@pytest.fixture(scope="module")
def ca() -> SandboxCA:
    return SandboxCA.create(SEED, "sb-123", [HOST, "*.wild.test"])


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str) -> ssl.SSLObject:
    """Run a TLS handshake in memory; the client's SSLObject (raises what the client raises)."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname=name)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = [False, False]
    for _ in range(20):
        for i, obj in enumerate((c, s)):
            if not done[i]:
                try:
                    obj.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done):
            return c
    raise AssertionError("handshake did not finish")


def client_ctx(ca: SandboxCA, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def forged_leaf(ca: SandboxCA, san: x509.GeneralName) -> tuple[bytes, bytes]:
    """(key PEM, cert PEM) of a leaf for another name, signed with the CA's key, as someone
    holding a leaked key could make it (reaching into the object on purpose)."""
    key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "forged")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca._key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def context_from(tmp: Path, key_pem: bytes, cert_pem: bytes, ca: SandboxCA) -> ssl.SSLContext:
    path = tmp / "chain.pem"
    path.write_bytes(key_pem + cert_pem + ca.cert_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(path)
    return ctx


def leaf_of(ca: SandboxCA, host: str, alpn: list[str] | None = None) -> x509.Certificate:
    obj = handshake(ca.server_context(host, alpn or []), client_ctx(ca, alpn), host)
    der = obj.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


# --------------------------------------------------------------------------- the CA itself


def test_key_is_derived_from_the_seed_and_load_round_trips(ca: SandboxCA) -> None:
    again = SandboxCA.create(SEED, "other", [HOST])
    ours = x509.load_pem_x509_certificate(ca.cert_pem).public_key()
    theirs = x509.load_pem_x509_certificate(again.cert_pem).public_key()
    assert ours.public_numbers() == theirs.public_numbers()  # type: ignore[union-attr]
    loaded = SandboxCA.load(SEED, ca.cert_pem)
    assert loaded.cert_pem == ca.cert_pem
    assert loaded.permitted == ca.permitted == ("api.x.test", "wild.test")
    # The reloaded CA issues leaves its clients trust.
    assert leaf_of(loaded, "a.wild.test").issuer == leaf_of(ca, HOST).issuer


def test_load_refuses_another_seed_or_a_non_ca(ca: SandboxCA) -> None:
    with pytest.raises(ValueError, match="does not belong"):
        SandboxCA.load(os.urandom(32), ca.cert_pem)
    with pytest.raises(ValueError):
        SandboxCA.load(SEED, b"not a certificate")
    with pytest.raises(ValueError):
        SandboxCA.create(b"short", "x", [HOST])


def test_ca_certificate_shape(ca: SandboxCA) -> None:
    cert = x509.load_pem_x509_certificate(ca.cert_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "corral sandbox CA sb-123"
    )
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    nc = cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert nc.critical
    assert [n.value for n in nc.value.permitted_subtrees or []] == ["api.x.test", "wild.test"]
    assert {str(n.value) for n in nc.value.excluded_subtrees or []} == {"0.0.0.0/0", "::/0"}
    now = dt.datetime.now(dt.UTC)
    assert cert.not_valid_before_utc < now - dt.timedelta(minutes=59)
    assert cert.not_valid_after_utc > now + dt.timedelta(days=3000)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)


def test_permitted_subtrees() -> None:
    assert permitted_subtree("*.Example.COM") == "example.com"
    assert permitted_subtree("api.x.com.") == "api.x.com"
    for bad in ("*", "*.", "192.0.2.1", "[::1]", "bad name.test", "a.*.test", ""):
        with pytest.raises(ValueError):
            permitted_subtree(bad)
    ca = SandboxCA.create(SEED, "x", ["a.example.com", "*.example.com", "b.test", "b.test"])
    assert ca.permitted == ("b.test", "example.com")  # covered names folded in
    with pytest.raises(ValueError):
        SandboxCA.create(SEED, "x", [])


def test_private_key_is_not_exposed(ca: SandboxCA) -> None:
    for name in dir(ca):
        if name.startswith("_"):
            continue
        value = getattr(ca, name)
        assert not isinstance(value, ec.EllipticCurvePrivateKey)
        if isinstance(value, bytes):
            assert b"PRIVATE KEY" not in value


# --------------------------------------------------------------------------- leaves


def test_leaf_shape_and_alpn(ca: SandboxCA) -> None:
    obj = handshake(ca.server_context(HOST, ["h2"]), client_ctx(ca, ["h2", "http/1.1"]), HOST)
    assert obj.selected_alpn_protocol() == "h2"
    assert obj.version() in ("TLSv1.2", "TLSv1.3")
    der = obj.getpeercert(binary_form=True)
    assert der is not None
    leaf = x509.load_der_x509_certificate(der)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [HOST]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert dt.timedelta(days=7) <= life <= dt.timedelta(days=7, hours=1)
    # Each host has its own fresh key, never the CA's.
    other = leaf_of(ca, "x.wild.test")
    assert other.public_key() != leaf.public_key() != ca_cert.public_key()


def test_long_host_names_get_an_empty_subject(ca: SandboxCA) -> None:
    host = ("a" * 60) + ".b.wild.test"
    leaf = leaf_of(ca, host)
    assert len(leaf.subject) == 0
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical


def test_contexts_and_leaves_are_cached(ca: SandboxCA) -> None:
    assert ca.server_context(HOST, ["h2"]) is ca.server_context(HOST, ["h2"])
    assert ca.server_context(HOST, ["h2"]) is not ca.server_context(HOST, ["http/1.1"])
    assert leaf_of(ca, HOST, ["h2"]) == leaf_of(ca, HOST, ["http/1.1"])  # one leaf per host
    fresh = SandboxCA.load(SEED, ca.cert_pem)
    for i in range(300):
        fresh.server_context(f"h{i}.wild.test", [])
    assert len(fresh._leaves) == len(fresh._contexts) == 256


def test_no_leaf_outside_the_permitted_names(ca: SandboxCA) -> None:
    for host in ("evil.test", "x.test", "wild.test.evil", "127.0.0.1"):
        with pytest.raises(ValueError):
            ca.server_context(host, [])
    assert ca.covers("wild.test") and ca.covers("a.b.wild.test") and not ca.covers("xwild.test")


# --------------------------------------------------------------------------- constraints


@pytest.mark.parametrize(
    ("san", "name"),
    [
        (x509.DNSName("evil.test"), "evil.test"),
        (x509.DNSName("api.x.test.evil.test"), "api.x.test.evil.test"),
    ],
)
def test_python_refuses_a_forged_leaf_for_another_name(
    ca: SandboxCA, tmp_path: Path, san: x509.GeneralName, name: str
) -> None:
    key_pem, cert_pem = forged_leaf(ca, san)
    with pytest.raises(ssl.SSLCertVerificationError, match="subtree violation"):
        handshake(context_from(tmp_path, key_pem, cert_pem, ca), client_ctx(ca), name)


def test_openssl_verify_enforces_the_constraints(ca: SandboxCA, tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    good = leaf_of(ca, HOST).public_bytes(serialization.Encoding.PEM)
    cases = {
        "good": (good, True),
        "dns": (forged_leaf(ca, x509.DNSName("evil.test"))[1], False),
        "ip": (
            forged_leaf(ca, x509.IPAddress(ipaddress.ip_address("1.2.3.4")))[1],
            False,
        ),
    }
    for label, (pem, ok) in cases.items():
        path = tmp_path / f"{label}.pem"
        path.write_bytes(pem)
        proc = subprocess.run(
            ["openssl", "verify", "-x509_strict", "-purpose", "sslserver",
             "-CAfile", str(tmp_path / "ca.pem"), str(path)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert (proc.returncode == 0) == ok, (label, proc.stdout, proc.stderr)
        if not ok:
            assert "subtree violation" in proc.stdout + proc.stderr


@contextlib.asynccontextmanager
async def tls_server(ctx: ssl.SSLContext) -> AsyncIterator[int]:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=ctx)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def run(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=None if env is None else {**os.environ, **env},
    )
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_curl_trusts_leaves_and_refuses_forged_names(ca: SandboxCA, tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.cert_pem)
    forged = context_from(tmp_path, *forged_leaf(ca, x509.DNSName("evil.test")), ca)
    for ctx, name, ok in ((ca.server_context(HOST, []), HOST, True), (forged, "evil.test", False)):
        async with tls_server(ctx) as port:
            code, out = await run(
                "curl", "-sS", "--cacert", str(ca_file), "--resolve", f"{name}:{port}:127.0.0.1",
                f"https://{name}:{port}/",
            )  # fmt: skip
        assert (code == 0) == ok, out
        if ok:
            assert out == "ok"
        else:
            assert code == 60 and "permitted subtree violation" in out, out


async def test_node_trusts_through_node_extra_ca_certs(ca: SandboxCA, tmp_path: Path) -> None:
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.cert_pem)
    script = (
        "const tls = require('tls');"
        "const [port, name] = process.argv.slice(1);"
        "const s = tls.connect({host: '127.0.0.1', port: +port, servername: name}, () => {"
        " console.log('ok'); s.end(); });"
        "s.on('error', e => { console.log(`${e.code}: ${e.message}`); process.exit(3); });"
    )
    forged = context_from(tmp_path, *forged_leaf(ca, x509.DNSName("evil.test")), ca)
    for ctx, name, ok in ((ca.server_context(HOST, []), HOST, True), (forged, "evil.test", False)):
        async with tls_server(ctx) as port:
            code, out = await run(
                "node", "-e", script, str(port), name, env={"NODE_EXTRA_CA_CERTS": str(ca_file)}
            )
        assert (code == 0) == ok, out
        if not ok:
            # OpenSSL's "permitted subtree violation" has no Node error code of its own.
            assert "permitted subtree violation" in out, out
