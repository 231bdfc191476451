"""The workers' event loop (issue 14): uvloop where installed, asyncio's own on request. That
the running gateway's workers use it: tests/test_faults.py."""

from __future__ import annotations

import os
import subprocess
import sys


def test_the_standard_loop_is_used_when_asked_for() -> None:
    probe = ("import asyncio; from enclave_gateway.services import loop\n"
             "async def kind() -> str: return type(asyncio.get_running_loop()).__module__\n"
             "print(loop.name(), loop.run(kind()))")
    for env, expected in (({}, "uvloop uvloop"), ({"GW_EVENT_LOOP": "asyncio"}, "asyncio asyncio.unix_events")):
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                             env={**os.environ, **env}, check=True).stdout.split()
        assert " ".join(out) == expected
