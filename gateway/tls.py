"""Certificates for the bus (issue 11 item 4): one CA of the deployment's, and a certificate for
the brokers that serves clients and routes between nodes, made by `gateway certs DIR` for tests and
demos (an enclave brings its own PKI and points the same settings at its files).

Why TLS on a loopback bus too: NKeys prove the client to the server, nothing proves the server to
the client. A review started a plain nats-server on the broker's port while the supervisor was
waiting to restart it, and every worker reconnected to it and handed it bearer tokens and prompts.
With the CA pinned and the TLS handshake first, a server without our certificate gets nothing.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365


@dataclass(frozen=True)
class BusCerts:
    """Where the CA and the brokers' certificate and key are."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def paths(folder: Path) -> BusCerts:
    """The files `make` writes into `folder`."""
    return BusCerts(folder / "ca.pem", folder / "broker.pem", folder / "broker-key.pem")


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Enclave Gateway"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(path, mode)


def make(folder: Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")) -> BusCerts:
    """A CA and a broker certificate for `hosts` (names or IP addresses), server and client use
    (routes between nodes authenticate both ways); keys 0600. Existing files are kept."""
    out = paths(folder)
    if out.ca_file.exists() and out.cert_file.exists() and out.key_file.exists():
        return out
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=VALID_DAYS)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("Enclave Gateway bus CA")
    signing_only = x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                 key_encipherment=False, data_encipherment=False, key_agreement=False,
                                 encipher_only=False, decipher_only=False)
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(signing_only, critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder().subject_name(_name("Enclave Gateway broker")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    _write(out.key_file, key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), 0o600)
    _write(out.cert_file, cert.public_bytes(pem), 0o644)
    _write(out.ca_file, ca.public_bytes(pem), 0o644)
    # the CA's key is not kept: nothing else is ever signed by it (make a new CA to add a host)
    return out


RENEW_WITHIN_DAYS = 30


def expiry(certs: BusCerts, now: datetime.datetime) -> tuple[str, str] | None:
    """("expired" | "soon", what to say) when the CA or the broker certificate has run out or runs out
    within RENEW_WITHIN_DAYS; None while both are good. An expired one makes every TLS handshake
    fail, which a worker reports only as a lost bus: `gateway up` refuses to start on it instead."""
    ends = {path.name: x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc
            for path in (certs.ca_file, certs.cert_file)}
    name, end = min(ends.items(), key=lambda kv: kv[1])
    how = (f"delete {certs.ca_file.parent} and run `gateway certs` (or install your PKI's files), "
           "then restart every node: workers pin the CA at start")
    if end <= now:
        return "expired", f"the bus TLS certificate {name} expired on {end:%Y-%m-%d}: {how}"
    if end - now <= datetime.timedelta(days=RENEW_WITHIN_DAYS):
        return "soon", f"the bus TLS certificate {name} expires on {end:%Y-%m-%d} ({(end - now).days} days): {how}"
    return None


def server_block(certs: BusCerts, *, verify: bool) -> str:
    """A nats-server `tls { }` block. `handshake_first`: TLS before the server says anything, so a
    client never reads a plaintext INFO from whoever holds the port; `verify`: the peer must show
    a certificate of the CA too (routes between nodes)."""
    return (f'tls {{ cert_file: "{certs.cert_file.resolve()}", key_file: "{certs.key_file.resolve()}", '
            f'ca_file: "{certs.ca_file.resolve()}", verify: {str(verify).lower()}, timeout: 5'
            f'{", handshake_first: true" if not verify else ""} }}\n')
