"""A fixed-answer OpenAI-compatible server: measures gateway overhead only, never used in tests
of invocation (DESIGN §5). Usage: python bench/fixed_backend.py PORT"""

from __future__ import annotations

import sys

from aiohttp import web

ANSWER = (b'{"id":"chatcmpl-fixed","object":"chat.completion","created":0,"model":"enclave-tiny",'
          b'"choices":[{"index":0,"message":{"role":"assistant","content":"fixed answer"},"finish_reason":"stop"}],'
          b'"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}')


async def chat(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=ANSWER, content_type="application/json")


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "enclave-tiny", "object": "model"}]})


if __name__ == "__main__":
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
