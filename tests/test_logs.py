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
