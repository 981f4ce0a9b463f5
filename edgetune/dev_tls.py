"""Test certificates for a TLS broker: a private CA and a server certificate signed by it.

For the tests and for trying `mqtts://` on one machine, not for production (use your own PKI
or Let's Encrypt there). Needs the `cryptography` package (`pip install cryptography`).

    python -m edgetune.dev_tls certs/                  # certs/ca.crt, server.crt, server.key (+ ca.key)
    python -m edgetune.dev_tls certs/ --host broker.lan --host 192.168.1.10

Then `listener 8883` with `cafile certs/ca.crt`, `certfile certs/server.crt`,
`keyfile certs/server.key` (`python -m broker.mosquitto_conf render --target secure`), and on
the clients `EDGETUNE_BROKER_URL=mqtts://<host>:8883 EDGETUNE_CA_FILE=certs/ca.crt`. The server
certificate names every `--host` as a subject alternative name (IP address or DNS name); the
clients check the broker's address against them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class CertFiles:
    """PEM files written by `make_test_certs`."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _crypto():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise RuntimeError(
            "edgetune.dev_tls needs the cryptography package: `pip install cryptography` "
            "(or make the certificates with openssl)"
        ) from None
    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


def _san(host: str, x509):
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write(path: Path, data: bytes, mode: int) -> None:
    # create with the final mode: a private key is never readable by others, not even briefly
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def _validity(days: int):
    now = dt.datetime.now(dt.timezone.utc)
    return now - dt.timedelta(hours=1), now + dt.timedelta(days=days)  # an hour back: clock skew


def _usage(x509, *, ca: bool):
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                         encipher_only=False, decipher_only=False)


def new_ca(name: str, days: int):
    """A CA: an EC P-256 key and its self-signed certificate (may sign certificates and CRLs)."""
    x509, hashes, _, ec, _, NameOID = _crypto()
    start, end = _validity(days)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "EdgeTune"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(x509, ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(ca_cert, ca_key, common_name: str, *, days: int, hosts: tuple[str, ...] | list[str] = (), key=None):
    """A certificate signed by the CA for `common_name` (and a new EC P-256 key unless `key` is
    given): with `hosts`, a server's (each host a subject alternative name), else a client's."""
    x509, hashes, _, ec, EKU, NameOID = _crypto()
    start, end = _validity(days)
    key = key or ec.generate_private_key(ec.SECP256R1())
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "EdgeTune"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(x509, ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([EKU.SERVER_AUTH if hosts else EKU.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    if hosts:
        b = b.add_extension(x509.SubjectAlternativeName([_san(h, x509) for h in hosts]), critical=False)
    return key, b.sign(ca_key, hashes.SHA256())


def pem_key(key) -> bytes:
    _, _, serialization, _, _, _ = _crypto()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def pem_cert(cert) -> bytes:
    _, _, serialization, _, _, _ = _crypto()
    return cert.public_bytes(serialization.Encoding.PEM)


def make_test_certs(directory: str | Path, hosts: tuple[str, ...] | list[str] = DEFAULT_HOSTS, *,
                    days: int = 30, ca_name: str = "EdgeTune test CA",
                    server_name: str | None = None) -> CertFiles:
    """Write ca.crt, ca.key, server.crt and server.key (EC P-256, SHA-256) into `directory`.

    The server certificate carries every host of `hosts` as a subject alternative name and is
    valid for `days` (from one hour ago, to allow for clock skew). Keys are written 0600.
    """
    if not hosts:
        raise ValueError("make_test_certs needs at least one host name or IP address for the server")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = new_ca(ca_name, days)
    key, cert = issue(ca_cert, ca_key, server_name or hosts[0], days=days, hosts=hosts)

    files = CertFiles(d / "ca.crt", d / "ca.key", d / "server.crt", d / "server.key")
    _write(files.ca_cert, pem_cert(ca_cert), 0o644)
    _write(files.server_cert, pem_cert(cert), 0o644)
    for path, k in ((files.ca_key, ca_key), (files.server_key, key)):
        _write(path, pem_key(k), 0o600)
    return files


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write a test CA and a server certificate for an mqtts:// broker.")
    ap.add_argument("directory", type=Path)
    ap.add_argument("--host", action="append", dest="hosts",
                    help=f"a name or IP address the broker is reached by (repeat; default {' '.join(DEFAULT_HOSTS)})")
    ap.add_argument("--days", type=int, default=30)
    args = ap.parse_args(argv)
    f = make_test_certs(args.directory, tuple(args.hosts or DEFAULT_HOSTS), days=args.days)
    print(f"CA certificate:     {f.ca_cert}   (clients: EDGETUNE_CA_FILE)\n"
          f"CA key:             {f.ca_key}   (keep it private; only needed to sign more certificates)\n"
          f"server certificate: {f.server_cert}   (mosquitto: certfile)\n"
          f"server key:         {f.server_key}   (mosquitto: keyfile)")


if __name__ == "__main__":
    main()
