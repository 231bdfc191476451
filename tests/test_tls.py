"""TLS on the bus (issue 11 item 4): a worker that pins the deployment's CA refuses a server that
cannot show its certificate, before sending anything (a review had workers hand a squatter on the
broker's port their bearer tokens and prompts). The cluster tests run over TLS throughout."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from pathlib import Path

import nats.errors
import pytest
from enclave_gateway import cli, nats_auth, tls
from enclave_gateway.broker import Broker
from enclave_gateway.services import bus
from enclave_gateway.services.settings import WorkerSettings

ASYNC = pytest.mark.asyncio(loop_scope="session")


def _settings(url: str, data: Path, ca: Path) -> WorkerSettings:
    return WorkerSettings(nats_url=url, data_dir=str(data), policy_dir="", creds_dir=str(data / "creds"),
                          nats_ca_file=str(ca))


@ASYNC
async def test_a_worker_talks_to_the_broker_its_ca_signed_and_to_no_other(tmp_path: Path) -> None:
    ours, theirs = tls.make(tmp_path / "ours"), tls.make(tmp_path / "theirs")
    nats_auth.ensure_creds(tmp_path / "creds")
    real = Broker(tmp_path / "real", creds_dir=tmp_path / "creds", certs=ours)
    plain = Broker(tmp_path / "plain")  # a squatter: no TLS, no authentication
    other = Broker(tmp_path / "other", certs=theirs)  # TLS, but not the deployment's CA
    for b in (real, plain, other):
        b.start()
    try:
        assert real.url.startswith("tls://")
        nc = await bus.connect(_settings(real.url, tmp_path, ours.ca_file), "admin", keep_trying=False)
        assert nc.is_connected and nc._server_info.get("tls_required")
        await nc.close()
        for squatter in (plain, other):
            url = squatter.url.replace("nats://", "tls://")
            with pytest.raises((ssl.SSLError, nats.errors.NoServersError, OSError)):
                await bus.connect(_settings(url, tmp_path, ours.ca_file), "admin", keep_trying=False)
    finally:
        for b in (real, plain, other):
            b.stop()


@ASYNC
async def test_nothing_is_said_in_plaintext_to_whoever_answers_on_the_port(tmp_path: Path) -> None:
    """A squatter that speaks NATS's greeting hears only a TLS ClientHello: no CONNECT, no nonce
    signature, no subject, whatever it says first."""
    ours = tls.make(tmp_path / "ours")
    nats_auth.ensure_creds(tmp_path / "creds")
    heard = bytearray()

    async def squat(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'INFO {"server_id":"x","version":"2.10.0","max_payload":1048576,"nonce":"abc"}\r\n')
        await writer.drain()
        with contextlib.suppress(Exception):
            heard.extend(await asyncio.wait_for(reader.read(4096), 3))
        writer.close()

    server = await asyncio.start_server(squat, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises((ssl.SSLError, nats.errors.NoServersError, OSError)):
            await bus.connect(_settings(f"tls://127.0.0.1:{port}", tmp_path, ours.ca_file), "admin",
                              keep_trying=False)
    finally:
        server.close()
    assert heard[:2] == b"\x16\x03", bytes(heard[:40])  # a TLS handshake record
    assert b"CONNECT" not in heard and b"sig" not in heard


def test_gateway_certs_makes_a_ca_and_a_broker_certificate_for_the_named_hosts(tmp_path: Path) -> None:
    from cryptography import x509

    assert cli.main(["certs", str(tmp_path / "tls"), "--host", "nats-1", "--host", "10.0.0.5"]) == 0
    made = tls.paths(tmp_path / "tls")
    cert = x509.load_pem_x509_certificate(made.cert_file.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["nats-1"]
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert oct(made.key_file.stat().st_mode & 0o777) == "0o600"
    ca = x509.load_pem_x509_certificate(made.ca_file.read_bytes())
    cert.verify_directly_issued_by(ca)


def test_a_bus_certificate_near_or_past_its_end_is_named_and_an_expired_one_refuses_the_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datetime

    from enclave_gateway import procs
    from enclave_gateway.runtime import Gateway

    certs = tls.make(tmp_path / "tls")
    now = datetime.datetime.now(datetime.UTC)
    assert tls.expiry(certs, now) is None  # a year left
    level, text = tls.expiry(certs, now + datetime.timedelta(days=350)) or ("", "")
    assert level == "soon" and "ca.pem" in text and "gateway certs" in text
    level, text = tls.expiry(certs, now + datetime.timedelta(days=366)) or ("", "")
    assert level == "expired" and "expired on" in text
    monkeypatch.setattr(tls, "VALID_DAYS", 0)  # valid for the five minutes `make` back-dates: ends about now
    root = Path(__file__).resolve().parent.parent
    gw = Gateway(tmp_path / "data", root / "policies", nats_port=-1, http_port=0, endpoints={}, serve_tiny=None,
                 nats_tls=True)
    import time
    time.sleep(0.01)
    with pytest.raises(procs.StartFailed, match="expired on"):
        gw.start()
    assert gw.broker.proc is None  # refused before anything started
