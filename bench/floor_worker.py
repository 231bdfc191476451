"""One hop of the bare 5-hop JetStream pipeline (the floor the gateway is compared with).

Hop i fetches `floor.<i>`, publishes to `floor.<i+1>` with a Nats-Msg-Id and awaits the PubAck,
then acks; the last hop replies on the client's inbox, after calling BACKEND_URL's chat endpoint
with the message's bytes when one is given (the HTTP floor: the upstream call is part of it).
Usage: floor_worker.py URL HOP HOPS ADMIN_SEED STREAM [BACKEND_URL]
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
import nats
from enclave_gateway.services import loop  # the loop the gateway's workers run on: uvloop


async def main(url: str, hop: int, hops: int, seed: str, stream: str, backend: str | None) -> None:
    nc = await nats.connect(url, nkeys_seed=seed, inbox_prefix="_INBOX_admin")
    js = nc.jetstream()
    prefix = stream.lower()
    psub = await js.pull_subscribe_bind(f"{prefix}{hop}", stream=stream)
    http = aiohttp.ClientSession() if backend else None
    print("ready", flush=True)

    async def one(msg: nats.aio.msg.Msg) -> None:
        headers = msg.headers or {}
        if hop == hops - 1:
            answer = msg.data
            if http is not None:
                async with http.post(f"{backend}/v1/chat/completions", data=msg.data,
                                     headers={"Content-Type": "application/json"}) as r:
                    answer = await r.read()
            await nc.publish(headers["reply"], answer)
        else:
            await js.publish(f"{prefix}.{hop + 1}", msg.data, headers={
                "reply": headers["reply"], "id": headers["id"], "Nats-Msg-Id": f"{headers['id']}:{hop}"})
        await msg.ack()

    while True:
        try:
            msgs = await psub.fetch(256, timeout=1)
        except nats.errors.TimeoutError:
            continue
        await asyncio.gather(*(one(m) for m in msgs))


if __name__ == "__main__":
    loop.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5],
                    sys.argv[6] if len(sys.argv) > 6 else None))
