"""`gateway up` / `status` / `token issue` as an operator runs them: real processes, clean stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jwt
import pytest
from enclave_gateway import cli, issuer, tinymodel
from enclave_gateway.services.authz.tokens import keyring
from enclave_gateway.services.settings import jwks_path

ROOT = Path(__file__).resolve().parent.parent


def test_token_issue_prints_a_verifiable_eddsa_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["token", "issue", "--sub", "alice", "--team", "alpha", "--role", "analyst",
                     "--clearance", "SECRET", "--compartment", "SI", "--caveat", "NOFORN",
                     "--data-dir", str(tmp_path)]) == 0
    token = capsys.readouterr().out.strip()
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "EdDSA"
    claims = jwt.decode(token, key=keyring([jwks_path(tmp_path / "keys").read_text()])[header["kid"]], algorithms=["EdDSA"],
                        audience="enclave-gateway")
    assert (claims["sub"], claims["team"], claims["roles"]) == ("alice", "alpha", ["analyst"])
    assert (claims["clearance"], claims["compartments"], claims["caveats"]) == ("SECRET", ["SI"], ["NOFORN"])
    assert oct((tmp_path / "keys" / issuer.KEY_FILE).stat().st_mode & 0o777) == "0o600"


def test_tiny_model_is_deterministic(tmp_path: Path) -> None:
    a, b = tinymodel.generate(tmp_path / "a.gguf"), tinymodel.generate(tmp_path / "b.gguf")
    assert a.read_bytes() == b.read_bytes() and 400_000 < a.stat().st_size < 600_000
    tokens, types, merges, printable = tinymodel.vocabulary()
    assert len(tokens) == 309 and len(merges) == 50 and len(printable) == 95 + 50


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_gateway_up_serves_reports_status_and_stops_without_orphans(tmp_path: Path) -> None:
    for sub in ("policies",):
        (tmp_path / sub).mkdir()
        for f in (ROOT / sub).iterdir():
            (tmp_path / sub / f.name).write_text(f.read_text())
    from enclave_gateway.procs import free_port

    http_port = free_port()
    (tmp_path / "gateway.toml").write_text(
        f'data_dir = "var"\npolicy_dir = "policies"\n[nats]\nport = -1\n[http]\nport = {http_port}\n')
    proc = subprocess.Popen([sys.executable, "-m", "enclave_gateway.cli", "up", "--config",
                             str(tmp_path / "gateway.toml")], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        line = ""
        while time.monotonic() < deadline and "Enclave Gateway up" not in line:
            line = proc.stdout.readline() if proc.stdout else ""
            assert proc.poll() is None, f"gateway up exited: {line}"
        token = issuer.issue(tmp_path / "var" / "keys", subject="op", team="alpha")
        body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "up?"}], "max_tokens": 3})
        req = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/chat/completions", data=body.encode(),
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert json.loads(resp.read())["usage"]["completion_tokens"] == 3
        status = subprocess.run([sys.executable, "-m", "enclave_gateway.cli", "status", "--data-dir",
                                 str(tmp_path / "var")], capture_output=True, text=True, timeout=30)
        assert status.returncode == 0 and "auditor" in status.stdout and "budget" in status.stdout
        server_pid = int(next(
            p for p in os.listdir("/proc") if p.isdigit() and _cmdline(p).startswith(
                str(Path(sys.executable).parent / "nats-server")) and str(tmp_path) in _cmdline(p)))
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "stopped cleanly" in out
    time.sleep(0.5)
    assert not _alive(server_pid)


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_the_demo_shows_completed_denied_write_down_and_over_budget(tmp_path: Path) -> None:
    """The README's first command, as a user runs it."""
    env = {**os.environ, "COLUMNS": "220"}
    out = subprocess.run([sys.executable, "-m", "enclave_gateway.cli", "demo", "--data-dir", str(tmp_path / "d")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    for needle in ("completed by enclave-tiny", "write_down (rule no-write-down)", "budget_exceeded",
                   "remaining", "model_forbidden", "token_expired", "token_unknown_key", "model_not_found",
                   "Violations (", "budget alert: team bravo", "Fallbacks",
                   "local-llama-2", "Streaming (stream: true)", "48 chunks, first after",
                   "48 completion tokens",  # issue 10: a streamed answer, token by token, with its usage
                   # issue 12: a marking in the prompt refuses by its rule, named with where it stands
                   "(rule content-marking)", "(S//NF) at message 1, character 14",
                   "rate_limited (rule rate-limit-application)", "Retry-After:"):
        assert needle in text, needle
    # issue 11 item 7: logs are 0640 and never hold a prompt
    logs = list((tmp_path / "d" / "logs").iterdir())
    assert logs and all(f.stat().st_mode & 0o777 == 0o640 for f in logs), [(f.name, oct(f.stat().st_mode)) for f in logs]
    assert not [f.name for f in logs if "Summarise the intercept" in f.read_text(errors="replace")
                or "The convoy leaves" in f.read_text(errors="replace")]
    status = subprocess.run([sys.executable, "-m", "enclave_gateway.cli", "sql",
                             "SELECT 'denied=' || count(*) AS n FROM events WHERE type = 'RequestDenied'", "--data-dir",
                             str(tmp_path / "d")], capture_output=True, text=True, timeout=60)
    # write-down, content marking, team, 3 tokens, unknown model
    assert status.returncode == 0 and "denied=7" in status.stdout

    # issue 9's assessor path after the demo has stopped: replay, export, verify offline
    def gateway(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "enclave_gateway.cli", *argv], capture_output=True, text=True,
                              timeout=180, env=env)

    data = str(tmp_path / "d")
    replayed = gateway("replay", "--data-dir", data)
    assert replayed.returncode == 0 and "(100.00%)" in replayed.stdout, replayed.stdout + replayed.stderr
    exported = gateway("evidence", "export", str(tmp_path / "pkg"), "--data-dir", data)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    anchor = str(tmp_path / "d" / "keys" / "audit-signer.pub.json")
    verified = gateway("evidence", "verify", str(tmp_path / "pkg"), "--audit-key", anchor)
    assert verified.returncode == 0 and "anchored" in verified.stdout, verified.stdout
    stream = tmp_path / "pkg" / "stream.parquet"
    body = bytearray(stream.read_bytes())
    body[len(body) // 3] ^= 0x01
    stream.write_bytes(bytes(body))
    assert gateway("evidence", "verify", str(tmp_path / "pkg"), "--audit-key", anchor).returncode == 1
