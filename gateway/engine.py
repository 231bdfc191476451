"""The local inference engine of the demo and tests: llama.cpp's OpenAI-compatible server
(llama-cpp-python[server]) serving the tiny model this project generates (DESIGN §5)."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from . import procs, tinymodel

MODEL_ALIAS = "enclave-tiny"


def ensure_model(models_dir: Path) -> Path:
    """The tiny GGUF, generated once (deterministic, about 0.5 MB)."""
    path = models_dir / "enclave-tiny.gguf"
    if not path.exists():
        models_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tinymodel.generate(tmp)
        tmp.replace(path)
    return path


class Engine:
    """A llama.cpp server process on a loopback port."""

    def __init__(self, data_dir: Path, port: int | None = None, name: str = "llama-server") -> None:
        self.data_dir, self.port, self.name = data_dir, port, name
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout_s: float = 60.0) -> str:
        """Start the server and return its base URL once /v1/models answers."""
        model = ensure_model(self.data_dir / "models")
        port = self.port = self.port or procs.free_port()  # a restart serves the invokers' same URL
        argv = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(model),
            "--model_alias",
            MODEL_ALIAS,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "512",
            "--n_threads",
            "1",
            "--n_threads_batch",
            "1",
            "--verbose",
            "False",
            # by default a new request cuts a streaming one short (a chat UI's choice): never here
            "--interrupt_requests",
            "False",
        ]
        self.proc = procs.spawn(argv, self.data_dir / "logs" / f"{self.name}.log")
        self.url = f"http://127.0.0.1:{port}"
        try:
            return self._wait_ready(timeout_s)
        except BaseException:  # a server that never answered is not left running
            procs.stop(self.proc, 2.0)
            self.proc = None
            raise

    def _wait_ready(self, timeout_s: float) -> str:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama server exited with {self.proc.returncode}; see {self.data_dir}/logs")
            try:
                with urllib.request.urlopen(f"{self.url}/v1/models", timeout=1) as resp:
                    if resp.status == 200:
                        return self.url
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"llama server not ready after {timeout_s}s")

    def stop(self) -> None:
        """Stop the server."""
        if self.proc is not None:
            procs.stop(self.proc)
            self.proc = None
