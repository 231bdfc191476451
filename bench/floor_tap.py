"""The readers the gateway's message pattern adds to a bare pipeline, with no logic: a durable
consumer of every hop's message, acked one by one after a batch (the auditor's Parquet path), an
ordered reader of every message (the auditor's hash chain) and an ordered reader of two hops'
messages (the router's replicated view). Usage: floor_tap.py URL ADMIN_SEED STREAM
"""

from __future__ import annotations

import sys

import nats
from enclave_gateway.services import loop  # the loop the gateway's workers run on: uvloop


async def main(url: str, seed: str, stream: str) -> None:
    nc = await nats.connect(url, nkeys_seed=seed, inbox_prefix="_INBOX_admin")
    js = nc.jetstream()
    prefix = stream.lower()
    psub = await js.pull_subscribe_bind(f"{prefix}tap", stream=stream)
    seen = 0

    async def count(msg: nats.aio.msg.Msg) -> None:
        nonlocal seen
        seen += len(msg.data) > 0

    await js.subscribe(f"{prefix}.>", stream=stream, ordered_consumer=True, cb=count)
    for hop in (2, 4):  # the router reads the routes and the completions again
        await js.subscribe(f"{prefix}.{hop}", stream=stream, ordered_consumer=True, cb=count)
    print("ready", flush=True)
    while True:
        try:
            msgs = await psub.fetch(500, timeout=0.5)
        except nats.errors.TimeoutError:
            continue
        for m in msgs:
            await m.ack()


if __name__ == "__main__":
    loop.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
