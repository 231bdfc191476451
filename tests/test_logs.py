"""Structured logs (issue 11 item 10): JSON lines that name the request, never its text."""

from __future__ import annotations

import json
import logging

from enclave_gateway.services import logs


def test_a_line_is_one_json_object_naming_the_request_and_an_exception_only_by_type() -> None:
    formatter = logs.JsonLines("router")
    token = logs.request_id.set("0123abcd")
    try:
        try:
            raise ValueError("the prompt was: launch codes")
        except ValueError:
            record = logging.getLogger("t").makeRecord("t", logging.WARNING, __file__, 1, "attempt %d failed", (2,),
                                                       exc_info=__import__("sys").exc_info())
        line = formatter.format(record)
    finally:
        logs.request_id.reset(token)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["service"] == "router" and parsed["msg"] == "attempt 2 failed" and parsed["level"] == "WARNING"
    assert parsed["request_id"] == "0123abcd" and parsed["exc_type"] == "ValueError"
    assert "launch codes" not in line


def test_the_request_id_is_read_from_an_events_message_id() -> None:
    assert logs.request_of_msg_id("0123abcd:route-2") == "0123abcd"
    assert logs.request_of_msg_id("seq-17") is None and logs.request_of_msg_id(None) is None


def test_an_exception_that_ends_the_process_is_one_more_json_line_without_its_message() -> None:
    """A worker that dies on an uncaught exception (in its loop or a thread) must not print a raw
    traceback: the log stays JSON lines, and the exception's text (a prompt, maybe) stays out."""
    import subprocess
    import sys

    script = ("import threading; from enclave_gateway.services import logs; logs.configure('router'); "
              "t = threading.Thread(target=lambda: 1 / 0); t.start(); t.join(); "
              "raise RuntimeError('the prompt was: launch codes')")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(e["level"], e["exc_type"]) for e in lines] == [("CRITICAL", "ZeroDivisionError"),
                                                           ("CRITICAL", "RuntimeError")]
    assert "launch codes" not in done.stderr and all(e["service"] == "router" for e in lines)


def test_an_error_no_one_awaited_is_named_by_type_without_the_tasks_repr() -> None:
    """asyncio's own report of a task's unretrieved exception prints its repr (a prompt, maybe);
    a worker's loop reports it as a JSON line instead (gateway worker sets the handler)."""
    import subprocess
    import sys

    script = ("import asyncio, gc; from enclave_gateway.services import logs, loop; logs.configure('edge')\n"
              "async def boom(): raise RuntimeError('the prompt was: launch codes')\n"
              "async def main():\n"
              "    asyncio.get_running_loop().set_exception_handler(logs.loop_exception)\n"
              "    t = asyncio.create_task(boom()); await asyncio.sleep(0.05); del t; gc.collect(); await asyncio.sleep(0.05)\n"
              "loop.run(main())")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(e["level"], e["exc_type"]) for e in lines] == [("ERROR", "RuntimeError")]
    assert "launch codes" not in done.stderr and "never retrieved" in lines[0]["msg"]
