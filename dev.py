#!/usr/bin/env python3
"""Quick start: `python3 dev.py demo` runs the demo, `python3 dev.py test` runs every check.

Each command first makes `.venv` and installs the project into it (editable, strict mode so mypy
can follow the package mapping; docs/architecture.md §Packaging). The first run compiles
llama.cpp for the local engine (several minutes on 2 cores); pip caches the wheel afterwards.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"
STAMP = VENV / ".dev-stamp"
PACKAGES = ("gateway", "services", "schemas", "replay")


def _fingerprint() -> str:
    """pyproject plus the list of modules: a strict editable install must be redone when files are added."""
    h = hashlib.sha256((ROOT / "pyproject.toml").read_bytes())
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            h.update(str(path.relative_to(ROOT)).encode())
    return h.hexdigest()


def setup() -> None:
    """Create .venv and install the project with its dev and engine extras when anything changed."""
    if sys.version_info < (3, 11):
        sys.exit(f"Python >= 3.11 is required, this is {sys.version.split()[0]}")
    if not (BIN / "python").exists():
        print("creating .venv ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    if STAMP.exists() and STAMP.read_text() == _fingerprint():
        return
    print("installing the project into .venv (the first run builds llama.cpp: several minutes) ...", flush=True)
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    pip = [str(BIN / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True, env=env)
    subprocess.run([*pip, "-e", ".[dev,engine]", "--config-settings", "editable_mode=strict"], check=True,
                   cwd=ROOT, env=env)
    STAMP.write_text(_fingerprint())


def run(*argv: str) -> int:
    """Run a tool from .venv in the repository root; returns its exit code."""
    print("$", " ".join(argv), flush=True)
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], cwd=ROOT).returncode


def test(extra: list[str]) -> int:
    """ruff, mypy --strict and the import contracts, then pytest; the first failure decides the exit code."""
    for step in (("ruff", "check", "services", "schemas", "replay", "gateway"),
                 ("mypy", "-p", "enclave_gateway"),
                 ("lint-imports",),
                 ("pytest", *extra)):
        code = run(*step)
        if code != 0:
            return code
    return 0


def main() -> int:
    """`demo [ARGS]` or `test [PYTEST ARGS]`."""
    if len(sys.argv) < 2 or sys.argv[1] not in {"demo", "test", "setup"}:
        print(__doc__)
        return 2
    setup()
    if sys.argv[1] == "demo":
        return run("gateway", "demo", *sys.argv[2:])
    if sys.argv[1] == "test":
        return test(sys.argv[2:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
