"""The event loop every worker runs on: uvloop where it is installed (Linux and macOS), else
asyncio's own.

Each request costs the gateway a dozen publishes, acknowledgements and deliveries across its
workers, and on a busy machine throughput is the cores divided by the CPU those cost. uvloop's
transports and scheduler cut the CPU per request by about a fifth in bench/run.py (issue 14;
docs/performance.md), with no change to what the workers decide. `GW_EVENT_LOOP=asyncio` runs the
standard loop instead, to rule the loop out when a fault is being chased.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def name() -> str:
    """The loop `run` uses here: "uvloop" or "asyncio"."""
    if os.environ.get("GW_EVENT_LOOP", "").lower() == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on a new loop of the kind `name()` says."""
    if name() == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
