"""Issue 10 item 7: enclave mode lets no byte leave the enclave. The allow-list is checked when the
invoker starts and again after every name resolution; the whole demo runs under a guard that fails
any connection to a non-loopback address."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import aiohttp
import pytest
from enclave_gateway.services import egress
from enclave_gateway.services.invoker import decider, hosted
from enclave_gateway.schemas.events import RouteSelected
from enclave_gateway.services.invoker.shell import call

from .samples import SAMPLES_BY_NAME

ROOT = Path(__file__).resolve().parent.parent
ENCLAVE = egress.parse(["10.20.0.0/16", "fd00::/8", "gpu-1.enclave.local"])


@pytest.mark.parametrize("url, refused", [
    ("http://10.20.3.4:8000", None),
    ("http://[fd00::5]:8000", None),
    ("http://gpu-1.enclave.local:8000", None),
    ("http://GPU-1.enclave.local.:8000", None),
    ("http://10.21.0.1:8000", "outside the enclave's networks"),
    ("https://api.openai.com", "not in the enclave allow-list"),
    ("http://169.254.169.254/latest", "outside the enclave's networks"),  # cloud metadata: refused
    ("file:///etc/passwd", "not an http(s) address"),
])
def test_an_endpoint_address_outside_the_allow_list_is_refused(url: str, refused: str | None) -> None:
    why = egress.refuse_url(url, ENCLAVE)
    assert why is None if refused is None else refused in str(why)


@pytest.mark.parametrize("entry", ["", "a b", "*.evil", "http://x"])
def test_an_allow_list_entry_that_is_neither_cidr_nor_host_is_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="neither a CIDR nor a host name"):
        egress.parse([entry])


def _up(base: str, body: bytes) -> hosted.Upstream:
    return hosted.Upstream(protocol="openai", url=f"{base}/v1/chat/completions", body=body,
                           headers={"Content-Type": "application/json"})


@pytest.mark.asyncio(loop_scope="session")
async def test_a_listed_name_is_refused_when_it_resolves_outside_the_enclave(engine: str) -> None:
    """After name resolution: `localhost` is listed, but resolves to 127.0.0.1, outside 10.20/16."""
    port = engine.rsplit(":", 1)[1]
    body = b'{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":1}'
    for allow, expected in ((egress.parse(["10.20.0.0/16", "localhost"]), "egress_refused"),
                            (egress.parse(["127.0.0.0/8"]), "egress_refused"),  # the name itself not listed
                            (egress.parse(["127.0.0.0/8", "localhost"]), None)):
        async with aiohttp.ClientSession(connector=egress.connector(allow)) as session:
            outcome = await call(session, _up(f"http://localhost:{port}", body), 30.0)
        if expected is None:
            assert isinstance(outcome, decider.CallAnswered) and outcome.status == 200
        else:
            assert isinstance(outcome, decider.CallFailed) and outcome.error == expected, outcome


GUARD = textwrap.dedent("""
    import ipaddress, os, socket, sys

    def _guard(event, args):
        if event != "socket.connect":
            return
        sock, address = args
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        host = str(address[0]).split("%")[0]
        if not ipaddress.ip_address(host).is_loopback:
            with open(os.environ["EGRESS_MARKER"], "a") as f:
                f.write(f"{os.getpid()} {sys.argv[:3]} -> {address}\\n")
            raise OSError(f"egress guard: {address} is outside the enclave")

    sys.addaudithook(_guard)
""")


def test_the_demo_in_enclave_mode_connects_to_nothing_outside_loopback(tmp_path: Path) -> None:
    """Every Python process of the demo (CLI, workers, both llama.cpp servers) runs under a guard that
    records and refuses any non-loopback connection; the guard itself is checked first."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(GUARD)
    marker = tmp_path / "egress.log"
    env = {**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "EGRESS_MARKER": str(marker), "COLUMNS": "200"}
    probe = subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('10.255.255.1', 9), 2)"],
                           env=env, capture_output=True, text=True, timeout=30)
    assert probe.returncode != 0 and "egress guard" in probe.stderr and marker.exists()  # the guard bites
    marker.unlink()
    out = subprocess.run([sys.executable, "-m", "enclave_gateway.cli", "demo", "--enclave", "--data-dir",
                          str(tmp_path / "d")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "enclave mode" in out.stdout and "completed by enclave-tiny" in out.stdout and "Fallbacks" in out.stdout
    assert not marker.exists(), marker.read_text()


@pytest.mark.asyncio(loop_scope="session")
async def test_a_model_servers_redirect_is_never_followed_out_of_the_enclave() -> None:
    """Found by a hostile review: aiohttp followed a 307 to an IP literal without asking the resolver."""
    import asyncio

    from enclave_gateway import procs

    outside_port, hits = procs.free_port(), []

    async def outside(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hits.append(await reader.read(1000))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        writer.close()

    async def redirecting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1000)
        writer.write(f"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.2:{outside_port}/v1\r\n"
                     "Content-Length: 0\r\n\r\n".encode())
        await writer.drain()
        writer.close()

    outer = await asyncio.start_server(outside, "127.0.0.2", outside_port)
    inner = await asyncio.start_server(redirecting, "127.0.0.1", 0)
    port = inner.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession(connector=egress.connector(egress.parse(["127.0.0.1/32"]))) as session:
            outcome = await call(session, _up(f"http://127.0.0.1:{port}", b'{"secret": "prompt"}'), 10.0)
    finally:
        inner.close()
        outer.close()
    assert isinstance(outcome, decider.CallAnswered) and outcome.status == 307 and hits == []
    route = SAMPLES_BY_NAME["RouteSelected"]
    assert isinstance(route, RouteSelected)
    [failed] = decider.decide(route, outcome, "pv", route.occurred_at)
    assert failed.error == "http_307"  # type: ignore[union-attr]
