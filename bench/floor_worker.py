"""One hop of the bare 5-hop JetStream pipeline (the floor the gateway is compared with).

Hop i fetches `floor.<i>`, publishes to `floor.<i+1>` with a Nats-Msg-Id and awaits the PubAck,
then acks; the last hop replies on the client's inbox. Usage: floor_worker.py URL HOP HOPS ADMIN_SEED
"""

from __future__ import annotations

import asyncio
import sys

import nats


async def main(url: str, hop: int, hops: int, seed: str) -> None:
    nc = await nats.connect(url, nkeys_seed=seed, inbox_prefix="_INBOX_admin")
    js = nc.jetstream()
    psub = await js.pull_subscribe_bind(f"hop{hop}", stream="FLOOR")
    print("ready", flush=True)

    async def one(msg: nats.aio.msg.Msg) -> None:
        headers = msg.headers or {}
        if hop == hops - 1:
            await nc.publish(headers["reply"], msg.data)
        else:
            await js.publish(f"floor.{hop + 1}", msg.data, headers={
                "reply": headers["reply"], "id": headers["id"], "Nats-Msg-Id": f"{headers['id']}:{hop}"})
        await msg.ack()

    while True:
        try:
            msgs = await psub.fetch(256, timeout=1)
        except nats.errors.TimeoutError:
            continue
        await asyncio.gather(*(one(m) for m in msgs))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
