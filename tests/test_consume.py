"""Issue 10 item 4: a slow message (a model call) never holds up the others, whether fetched with it
or after it; handling stays bounded."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from enclave_gateway.schemas import subjects
from enclave_gateway.services import bus
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import NoStreamResponseError

from .conftest import publish_signed

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_one_slow_message_does_not_hold_up_the_rest(admin: Client, stack) -> None:
    js = admin.jetstream()
    durable = f"slow-{uuid.uuid4().hex[:8]}"
    # in the stream, signed by the router, which owns the subject; its reader skips them as junk
    subject = subjects.endpoint_observed(durable)
    await js.add_consumer(subjects.STREAM, ConsumerConfig(durable_name=durable, filter_subject=subject,
                                                          ack_policy=AckPolicy.EXPLICIT, ack_wait=30))
    release, done, running, most = asyncio.Event(), {}, 0, 0

    async def handle(msg: Msg) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            if msg.data == b"slow":
                await release.wait()
            done[msg.data] = time.monotonic()
        finally:
            running -= 1

    await publish_signed(js, stack.creds_dir, "router", subject, b"slow")
    for i in range(3):
        await publish_signed(js, stack.creds_dir, "router", subject, f"quick-{i}".encode())
    stop = asyncio.Event()
    task = asyncio.create_task(bus.consume(js, durable, handle, stop, batch=2))  # 2 slots: slow takes one
    try:
        for i in range(3, 6):  # published after the first fetch: they still get through
            await asyncio.sleep(0.2)
            await publish_signed(js, stack.creds_dir, "router", subject, f"quick-{i}".encode())
        deadline = time.monotonic() + 15
        while len(done) < 6 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert set(done) == {f"quick-{i}".encode() for i in range(6)}  # all while the slow one still ran
        assert most <= 2  # bounded by the slots
        release.set()
        while b"slow" not in done and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert b"slow" in done
    finally:
        release.set()
        stop.set()
        await asyncio.wait_for(task, 10)
    info = await js.consumer_info(subjects.STREAM, durable)
    assert info.num_ack_pending == 0 and info.num_pending == 0  # every one acknowledged


async def test_a_record_outlasts_an_outage_longer_than_every_retry_and_is_written_once(admin: Client, stack) -> None:
    """A settlement (the model ran, the caller has its answer) is never given up: a write refused
    for longer than the ack wait and all MAX_DELIVER attempts is retried in place until it lands."""
    js = admin.jetstream()
    durable = f"rec-{uuid.uuid4().hex[:8]}"
    subject = subjects.endpoint_observed(durable)
    await js.add_consumer(subjects.STREAM, ConsumerConfig(durable_name=durable, filter_subject=subject,
                                                          ack_policy=AckPolicy.EXPLICIT, ack_wait=3.0,
                                                          max_deliver=bus.MAX_DELIVER))
    refused_until = time.monotonic() + 7.0  # over two ack waits
    writes: list[int] = []
    deliveries: list[int] = []

    async def write() -> None:
        if time.monotonic() < refused_until:
            raise NoStreamResponseError
        writes.append(1)

    async def handle(msg: Msg) -> None:
        deliveries.append(msg.metadata.num_delivered)
        await bus.outlasting_outages(write, msg, durable, stop)

    stop = asyncio.Event()
    await publish_signed(js, stack.creds_dir, "router", subject, b"settle me")
    task = asyncio.create_task(bus.consume(js, durable, handle, stop))
    try:
        deadline = time.monotonic() + 20
        while not writes and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(3.5)  # past another ack wait: an unacked message would come again
        info = await js.consumer_info(subjects.STREAM, durable)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert writes == [1] and deliveries == [1], (writes, deliveries)  # kept in progress: never redelivered
    assert info.num_ack_pending == 0 and info.num_pending == 0


@pytest.mark.parametrize("error", ["MaxPayloadError", "ConnectionClosedError"])
async def test_a_record_that_can_never_be_written_is_not_retried_in_place(error: str) -> None:
    """Only an outage is waited out: a write refused for itself (too large) goes back to the usual
    bounded retries at once, so a forged oversized event cannot hold a responder's slot forever;
    a closed connection is never reopened by nats-py, so the worker must exit and be restarted."""
    import nats.errors

    calls = 0

    async def cannot() -> None:
        nonlocal calls
        calls += 1
        raise getattr(nats.errors, error)

    with pytest.raises(getattr(nats.errors, error)):
        await asyncio.wait_for(bus.outlasting_outages(cannot, object(), "edge", asyncio.Event()), 5)  # type: ignore[arg-type]
    assert calls == 1
