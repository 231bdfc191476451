"""The HTTP floor's front: an aiohttp server that puts each chat request on the bare pipeline's
first hop and answers with what its last hop replies (the backend's answer).
Usage: http_floor.py NATS_URL ADMIN_SEED STREAM PORT
"""

from __future__ import annotations

import asyncio
import sys
import uuid

import nats
from aiohttp import web
from enclave_gateway.services import loop  # the loop the gateway's workers run on: uvloop


async def serve(url: str, seed: str, stream: str, port: int) -> None:
    nc = await nats.connect(url, nkeys_seed=seed, inbox_prefix="_INBOX_admin")
    js = nc.jetstream()
    prefix = stream.lower()

    async def chat(request: web.Request) -> web.Response:
        body = await request.read()
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, max_msgs=1)
        await js.publish(f"{prefix}.0", body, headers={"reply": inbox, "id": uuid.uuid4().hex})
        answer = await sub.next_msg(timeout=30)
        return web.Response(body=answer.data, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    loop.run(serve(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
