"""The Parquet tables analysts and assessors query are a public contract (issue 9 item 9): their
schemas are frozen in tests/golden_parquet/ and a change must be deliberate (a new golden file and
a note in docs/architecture.md), never an accident of a refactor."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from enclave_gateway.evidence import STREAM_SCHEMA
from enclave_gateway.services.auditor.parquet_sink import SCHEMA, VIOLATION_SCHEMA

GOLDEN = Path(__file__).parent / "golden_parquet"


@pytest.mark.parametrize("name, schema", [("events", SCHEMA), ("violations", VIOLATION_SCHEMA),
                                          ("stream", STREAM_SCHEMA)])
def test_a_released_table_keeps_its_schema(name: str, schema: pa.Schema) -> None:
    golden = json.loads((GOLDEN / f"{name}.json").read_text())
    assert [{"name": f.name, "type": str(f.type)} for f in schema] == golden
