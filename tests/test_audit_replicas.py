"""Several auditor replicas on one stream (issue 14's scaling bench found this): each replica's
chain has no holes, so it reads from the stream what the shared durable handed the others. One
read per hole made a consumer per message, the stream's consumer limit (1,000 by default since
nats-server 2.15) was reached within seconds, and every auditor died."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import msgspec
import pytest
from enclave_gateway import procs, supervisor
from enclave_gateway.schemas import codec, subjects
from enclave_gateway.schemas.commands import ChatBody, ChatMessage, SubmitRequest
from enclave_gateway.services.auditor.shell import _holes
from enclave_gateway.services.settings import WorkerSettings
from nats.aio.client import Client

from .conftest import APP

REPLICAS = 3
REQUESTS = 400


def test_a_batch_has_holes_only_where_a_sequence_is_missing_after_the_last_folded() -> None:
    assert not _holes(10, [11, 12, 13])
    assert not _holes(10, [9, 10, 11])  # redeliveries of what is on disk are no holes
    assert _holes(10, [12]) and _holes(10, [11, 13]) and _holes(0, [2, 3])
    assert not _holes(10, [])


def _replica(stack: WorkerSettings, home: Path) -> subprocess.Popen[bytes]:
    """An auditor process with a data dir of its own (its own Parquet files, as on its own machine)
    and the deployment's audit keys."""
    shutil.copytree(Path(stack.data_dir) / "keys", home / "keys")
    return supervisor.spawn_worker(msgspec.structs.replace(stack, data_dir=str(home)), "auditor")


async def test_auditor_replicas_share_a_busy_stream_without_exhausting_its_consumers(
        stack: WorkerSettings, client: Client, admin: Client, token_for, tmp_path: Path) -> None:
    replicas = [_replica(stack, tmp_path / f"auditor-{i}") for i in range(REPLICAS)]
    try:
        for i, proc in enumerate(replicas):
            procs.wait_for_line(tmp_path / f"auditor-{i}" / "logs" / "auditor.log", "auditor consuming", proc, 60)
        token = token_for("tight")
        ask = codec.encode(SubmitRequest(token=token, chat=ChatBody(
            model="analyst-large", messages=(ChatMessage(role="user", content="may I?"),), max_tokens=4)))
        jsm = admin.jsm()
        most = 0

        async def watch() -> None:
            nonlocal most
            while True:  # the auditors' reads of the stream (their chain readers are named auditor_chain_)
                names = [c.name for c in await jsm.consumers_info(subjects.STREAM)]
                most = max(most, sum(n.startswith("auditor_") and not n.startswith("auditor_chain_") for n in names))
                await asyncio.sleep(0.2)

        watching = asyncio.create_task(watch())
        gate = asyncio.Semaphore(32)

        async def one() -> str | None:
            async with gate:
                reply = codec.decode_reply((await client.request(subjects.submit(APP), ask, timeout=60)).data)
                return reply.error.rule if reply.error else None

        rules = await asyncio.gather(*(one() for _ in range(REQUESTS)))
        await asyncio.sleep(3.0)  # the replicas read what the others were handed
        watching.cancel()
        assert rules == ["team-model-access"] * REQUESTS
        assert [p.poll() for p in replicas] == [None] * REPLICAS, "an auditor replica died"
        assert most <= 4 * (REPLICAS + 1), f"{most} consumers of the auditors' reads on the stream at once"
        for i in range(REPLICAS):
            log = (tmp_path / f"auditor-{i}" / "logs" / "auditor.log").read_text()
            assert "CRITICAL" not in log and "ERROR" not in log, log[-2000:]
    finally:
        for proc in replicas:
            procs.stop(proc)


pytestmark = pytest.mark.timeout(300)
