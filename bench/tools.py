"""Tools the benchmark runs beside the gateway, each in a venv of its own so that neither touches
the project's dependencies: LiteLLM's proxy (the baseline the HTTP edge is compared with) and
py-spy (the hot-path profiles). Created once under ~/.cache/enclave-gateway-bench from PyPI (or the
deployment's mirror); `--no-litellm` / `--no-profiles` skip them where no registry is reachable.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

CACHE = Path(os.environ.get("GW_BENCH_CACHE", Path.home() / ".cache" / "enclave-gateway-bench"))
LITELLM = "litellm[proxy]==1.108.7"  # the version ../shared/notes/baselines.md measured
PY_SPY = "py-spy==0.4.1"
# LiteLLM reads its cost map, beta headers, blog posts, policy templates and router presets from
# the internet unless told otherwise; with these it connects only to loopback (baselines.md)
LITELLM_OFFLINE = {k: "True" for k in (
    "LITELLM_LOCAL_MODEL_COST_MAP", "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS", "LITELLM_LOCAL_BLOG_POSTS",
    "LITELLM_LOCAL_POLICY_TEMPLATES", "LITELLM_LOCAL_AUTOROUTER_PRESETS", "LITELLM_TELEMETRY_DISABLED")}


def tool_venv(name: str, requirement: str, command: str) -> Path:
    """`command` inside a venv of its own holding `requirement`, made on first use."""
    venv = CACHE / name
    exe = venv / "bin" / command
    marker = venv / ".installed"
    if exe.exists() and marker.exists() and marker.read_text() == requirement:
        return exe
    print(f"installing {requirement} into {venv} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", requirement], check=True)
    marker.write_text(requirement)
    return exe


@contextlib.contextmanager
def litellm_proxy(backend: str, port: int, logs: Path) -> Iterator[tuple[str, str]]:
    """LiteLLM's proxy, one worker, in front of `backend` as model `enclave-tiny`: its base URL and
    its master key (it refuses to start without one; callers present it, as ours present a token)."""
    exe = tool_venv("litellm", LITELLM, "litellm")
    logs.mkdir(parents=True, exist_ok=True)
    config = logs / "litellm.yaml"
    config.write_text("model_list:\n  - model_name: enclave-tiny\n    litellm_params:\n"
                      f"      model: openai/enclave-tiny\n      api_base: {backend}/v1\n      api_key: none\n"
                      "litellm_settings:\n  telemetry: false\n")
    key = "sk-bench-" + secrets.token_hex(16)
    env = {**os.environ, **LITELLM_OFFLINE, "LITELLM_MASTER_KEY": key}
    with open(logs / "litellm.log", "wb") as out:
        proc = subprocess.Popen([str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"litellm exited with {proc.returncode}; see {logs / 'litellm.log'}")
            try:
                urllib.request.urlopen(f"{url}/health/liveliness", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"litellm not ready after 120 s; see {logs / 'litellm.log'}") from None
                time.sleep(0.5)
        yield url, key
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def profile(pids: dict[str, int], seconds: float, out: Path) -> dict[str, subprocess.Popen[bytes]]:
    """Start py-spy on each process for `seconds` (collapsed stacks, `<name>.txt` in `out`)."""
    exe = tool_venv("py-spy", PY_SPY, "py-spy")
    out.mkdir(parents=True, exist_ok=True)
    # --native: the workers' loop is uvloop, C code a Python-only profile shows as one opaque frame
    return {name: subprocess.Popen([str(exe), "record", "--pid", str(pid), "--duration", str(int(seconds)),
                                    "--rate", "100", "--native", "--format", "raw",
                                    "--output", str(out / f"{name}.txt")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name, pid in pids.items()}


IDLE = ("epoll_pwait", "epoll_wait", "select (selectors.py")  # a loop waiting for I/O, not working


def hottest(collapsed: Path, top: int = 6) -> list[tuple[str, float]]:
    """Where a process spent its working samples (self time; samples of the loop waiting for I/O
    left out, their share reported as `(waiting)`), as (function, share of working samples)."""
    own: dict[str, int] = {}
    busy = idle = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        if leaf.startswith(IDLE):
            idle += int(count)
            continue
        own[leaf] = own.get(leaf, 0) + int(count)
        busy += int(count)
    if not busy:
        return []
    ranked = [(f, round(n / busy, 3)) for f, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]]
    return [("(waiting)", round(idle / (idle + busy), 3)), *ranked]
