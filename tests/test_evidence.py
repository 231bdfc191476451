"""Issue 9 item 6 (in part): the evidence package verifies offline, and every tampering an
assessor would try is detected with its place named."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from enclave_gateway import cli, evidence
from enclave_gateway.replay import package as pkg
from enclave_gateway.replay.verify import verify
from enclave_gateway.schemas import codec, subjects
from enclave_gateway.schemas.commands import ChatBody, ChatMessage, SubmitRequest
from enclave_gateway.services import bus, fact_signatures, keys
from enclave_gateway.services.auditor import checkpoints
from enclave_gateway.services.settings import WorkerSettings

from .conftest import APP

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
async def exported(stack: WorkerSettings, token_for, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A package of the session's stream, after a completed and a denied request."""
    nc = await bus.connect(stack, f"app.{APP}")
    try:
        for token in (token_for("gamma"), ""):
            body = SubmitRequest(token=token, chat=ChatBody(model="enclave-tiny", messages=(
                ChatMessage(role="user", content="evidence"),), max_tokens=2))
            await nc.request(subjects.submit(APP), codec.encode(body), timeout=30)
    finally:
        await nc.close()
    out = tmp_path_factory.mktemp("evidence") / "package"
    await evidence.export(stack, out)
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _audit_file_with_requests(root: Path) -> Path:
    """An audit table holding request rows (with a team and a prompt digest), not only other facts."""
    return next(root / n for n in pkg.listed_files(root) if n.startswith(f"{pkg.AUDIT}/events/")
                and any(r["team"] for r in pq.read_table(root / n).to_pylist())
                and any(r["prompt_hmac"] for r in pq.read_table(root / n).to_pylist()))


def _problems(root: Path) -> list[str]:
    return [f"{f.where}: {f.problem}" for f in verify(root).findings]


async def test_an_untouched_package_verifies(exported: Path) -> None:
    report = verify(exported)
    assert report.ok, report.findings
    manifest = msgspec.json.decode((exported / pkg.MANIFEST).read_bytes(), type=pkg.Manifest)
    assert report.events == manifest.events > 0 and report.files == len(manifest.files)
    assert {pkg.STREAM, pkg.REGISTER, pkg.CHECKPOINTS, pkg.VIOLATIONS_CSV} <= set(manifest.files)
    register = json.loads((exported / pkg.REGISTER).read_text())
    assert register["policy_in_force"] and register["catalog"] and register["audit_signer"]["kid"] == report.signer
    assert "token_missing" in (exported / pkg.VIOLATIONS_CSV).read_text()
    page = (exported / "validation.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) == 4 and all((exported / i).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert "plots/replay_result.png" in images
    assert all(i in manifest.files for i in images) and "validation.html" in manifest.files
    assert "decisions reproduced by replay" in page
    summary = msgspec.json.decode((exported / pkg.REPLAY).read_bytes(), type=pkg.ReplaySummary)
    assert summary.decisions > 0 and summary.reproduced > 0
    assert all(control in page for control in ("AU-2", "AU-3", "AU-9(3)", "AU-10", "AU-11", "AU-12", "AC-3",
                                                "AC-4", "AC-16"))
    assert cli.main(["evidence", "verify", str(exported)]) == 0


@pytest.mark.parametrize("name", [pkg.STREAM, pkg.REGISTER, pkg.CHECKPOINTS, pkg.VIOLATIONS_CSV, "audit-file",
                                  pkg.MANIFEST])
async def test_one_changed_byte_in_any_file_fails_naming_it(exported: Path, tmp_path: Path, name: str) -> None:
    root = _copy(exported, tmp_path / "p")
    if name == "audit-file":
        name = next(n for n in pkg.listed_files(root) if n.startswith(pkg.AUDIT))
    path = root / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    problems = _problems(root)
    assert problems and any(p.startswith(name) for p in problems), problems
    assert cli.main(["evidence", "verify", str(root)]) == 1


def _auditor_signed(stack: WorkerSettings, subject: str, data: bytes) -> dict[str, str]:
    """The signature columns of `data` on `subject` as the auditor would have stored it."""
    signer = fact_signatures.load_signer(stack.creds_dir, "auditor")
    assert signer is not None
    headers = signer.headers(subject, signer.msg_id(f"x{len(data)}:checkpoint"), data)
    return {"msg_id": headers["Nats-Msg-Id"], "signer": headers[fact_signatures.SIGNER],
            "signature": headers[fact_signatures.SIGNATURE]}


def _rewrite_stream(root: Path, edit) -> None:  # type: ignore[no-untyped-def]
    """Rewrite the exported stream and update the manifest's digest of it (not its signature)."""
    table = pq.read_table(root / pkg.STREAM)
    rows = edit(table.to_pylist())
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), root / pkg.STREAM)
    manifest = msgspec.json.decode((root / pkg.MANIFEST).read_bytes(), type=pkg.Manifest)
    files = {**manifest.files, pkg.STREAM: pkg.file_entry(root / pkg.STREAM)}
    (root / pkg.MANIFEST).write_bytes(msgspec.json.encode(msgspec.structs.replace(manifest, files=files)))


async def test_a_deleted_event_is_named_by_its_sequence(exported: Path, tmp_path: Path) -> None:
    root = _copy(exported, tmp_path / "p")
    _rewrite_stream(root, lambda rows: rows[:5] + rows[6:])
    problems = _problems(root)
    assert any("seq 6..6 are missing" in p for p in problems), problems
    assert any(p.startswith(pkg.MANIFEST) and "signature" in p for p in problems)  # re-signing needs the key


async def test_reordered_events_are_named(exported: Path, tmp_path: Path) -> None:
    root = _copy(exported, tmp_path / "p")
    _rewrite_stream(root, lambda rows: [*rows[:3], rows[4], rows[3], *rows[5:]])
    problems = _problems(root)
    assert any("seq 4 comes after seq 5" in p for p in problems), problems


async def test_a_changed_event_is_named_even_with_a_consistent_file_digest(exported: Path, tmp_path: Path) -> None:
    root = _copy(exported, tmp_path / "p")

    def alter(rows: list[dict[str, object]]) -> list[dict[str, object]]:
        row = rows[2]
        row["data"] = bytes(row["data"]).replace(b'"', b"'", 1)  # type: ignore[call-overload]
        return rows

    _rewrite_stream(root, alter)
    problems = _problems(root)
    assert any("(seq 3)" in p and "differ from the digest the auditor recorded" in p for p in problems), problems
    assert any("does not reach the signed head" in p for p in problems)


async def test_a_truncated_tail_is_detected(exported: Path, tmp_path: Path) -> None:
    root = _copy(exported, tmp_path / "p")
    _rewrite_stream(root, lambda rows: rows[:-3])
    problems = _problems(root)
    assert any("truncated" in p for p in problems), problems


async def test_a_swapped_file_and_an_extra_file_are_detected(exported: Path, tmp_path: Path) -> None:
    root = _copy(exported, tmp_path / "p")
    shutil.copy(root / pkg.REGISTER, root / pkg.CHECKPOINTS)
    (root / "planted.csv").write_text("team,spent\nalpha,0\n")
    problems = _problems(root)
    assert any(p.startswith(pkg.CHECKPOINTS) and "changed or swapped" in p for p in problems), problems
    assert any(p.startswith("planted.csv") and "not listed" in p for p in problems)


async def test_a_package_re_signed_with_another_key_is_refused(exported: Path, tmp_path: Path) -> None:
    root = _copy(exported, tmp_path / "p")
    pem, public = keys.generate()
    other = keys.load_private_pem(pem)
    raw = (root / pkg.MANIFEST).read_bytes()
    sig = pkg.ManifestSignature(kid=public.kid, signature=keys.sign(other, pkg.signing_message(raw)))
    (root / pkg.MANIFEST_SIG).write_bytes(msgspec.json.encode(sig))
    problems = _problems(root)
    assert any("does not verify with the register's audit key" in p for p in problems), problems


async def test_a_checkpoint_the_audit_key_did_not_sign_is_a_notice(exported: Path, tmp_path: Path,
                                                                   stack: WorkerSettings) -> None:
    """Anyone with a publish right could have put it there: it vouches for nothing, and says so."""
    root = _copy(exported, tmp_path / "p")
    pem, public = keys.generate()
    other = keys.load_private_pem(pem)
    cursor = checkpoints.Cursor(seq=2, head="ab" * 32)
    forged = checkpoints.checkpoint(cursor, public.kid, keys.sign(other, checkpoints.unsigned(cursor)),
                                    datetime(2026, 11, 28, tzinfo=UTC))

    def append(rows: list[dict[str, object]]) -> list[dict[str, object]]:
        last = rows[-1]
        # signed as the auditor, which owns the subject: only the audit key's signature is missing
        data = codec.encode(forged)
        return [*rows, {**last, "seq": int(str(last["seq"])) + 1, "subject": subjects.audit_checkpoint(),
                        "data": data, **_auditor_signed(stack, subjects.audit_checkpoint(), data)}]

    _rewrite_stream(root, append)
    report = verify(root)
    assert any("vouches for nothing" in n.problem and "seq 2" in n.problem for n in report.notices)
    assert not any("vouches" in f.problem for f in report.findings)


def _resign(root: Path, key_file: Path) -> None:
    """What an export does after the files are written: every digest, then the audit key's signature."""
    manifest = msgspec.json.decode((root / pkg.MANIFEST).read_bytes(), type=pkg.Manifest)
    files = {n: pkg.file_entry(root / n) for n in pkg.listed_files(root)}
    raw = msgspec.json.encode(msgspec.structs.replace(manifest, files=files))
    (root / pkg.MANIFEST).write_bytes(raw)
    key = keys.load_private(key_file)
    sig = pkg.ManifestSignature(kid=keys.public_of(key).kid, signature=keys.sign(key, pkg.signing_message(raw)))
    (root / pkg.MANIFEST_SIG).write_bytes(msgspec.json.encode(sig))


async def test_audit_tables_edited_before_an_honest_export_are_caught_row_by_row(
        exported: Path, stack: WorkerSettings, tmp_path: Path) -> None:
    """The export signs what it copies: the verifier rebuilds every derived file from the stream."""
    root = _copy(exported, tmp_path / "p")
    table_file = _audit_file_with_requests(root)
    rows = pq.read_table(table_file).to_pylist()
    target = next(r for r in rows if r["team"])
    target["team"] = "someone-else"
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(table_file)), table_file)
    (root / pkg.VIOLATIONS_CSV).write_text("seq,request_id,rule,reason\n")
    _resign(root, stack.audit_key_file)
    problems = _problems(root)
    assert any(f"row for seq {target['seq']} differs from the stream in team" in p for p in problems), problems
    assert any(p.startswith(pkg.VIOLATIONS_CSV) for p in problems)


async def test_audit_rows_duplicated_dropped_or_blanked_are_each_named(exported: Path, stack: WorkerSettings,
                                                                       tmp_path: Path) -> None:
    """The column-wise comparison passes equal rows only: every other row is named, in the auditor's
    schema or a table rewritten with another one."""
    root = _copy(exported, tmp_path / "p")
    table_file = _audit_file_with_requests(root)
    schema = pq.read_schema(table_file)
    rows = pq.read_table(table_file).to_pylist()
    dropped = rows.pop(0)
    blanked = next(r for r in rows if r["prompt_hmac"])
    blanked["prompt_hmac"] = None
    moved = rows[-1]
    moved["occurred_at"] = moved["occurred_at"] + timedelta(seconds=1)
    rows.append(dict(rows[1]))
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), table_file)
    _resign(root, stack.audit_key_file)
    problems = _problems(root)
    assert any(f"row for seq {blanked['seq']} differs from the stream in prompt_hmac" in p for p in problems)
    assert any(f"row for seq {moved['seq']} differs from the stream in occurred_at" in p for p in problems)
    assert any(f"row for seq {rows[1]['seq']}: no such event in the stream, or a second row" in p for p in problems)
    assert any(f"have no audit row, first seq {dropped['seq']}" in p for p in problems), problems

    retyped = _copy(exported, tmp_path / "retyped")  # same values, another schema: checked row by row
    retyped_file = retyped / table_file.relative_to(root)
    table = pq.read_table(retyped_file)
    pq.write_table(table.cast(pa.schema([pa.field(f.name, pa.large_string() if f.name == "team" else f.type)
                                         for f in table.schema])), retyped_file)
    _resign(retyped, stack.audit_key_file)
    assert not [p for p in _problems(retyped) if "audit" in p], _problems(retyped)


async def test_a_swapped_audit_key_fails_against_the_trust_anchor(exported: Path, stack: WorkerSettings,
                                                                  tmp_path: Path) -> None:
    root = _copy(exported, tmp_path / "p")
    pem, public = keys.generate()
    mallory = tmp_path / "mallory.key"
    keys.write_private(mallory, pem)
    register = json.loads((root / pkg.REGISTER).read_text())
    register["audit_signer"] = msgspec.to_builtins(public)
    (root / pkg.REGISTER).write_text(json.dumps(register))
    _resign(root, mallory)
    unanchored = verify(root)
    assert any("UNANCHORED" in n.problem for n in unanchored.notices) and unanchored.fingerprint
    trusted = keys.load_public(stack.audit_key_file.with_name("audit-signer.pub.json"))
    anchored = verify(root, trusted)
    assert any("is not the trusted audit key" in f.problem for f in anchored.findings)
    assert verify(exported, trusted).ok and verify(exported, trusted).anchored
    pub_file = stack.audit_key_file.with_name("audit-signer.pub.json")
    assert cli.main(["evidence", "verify", str(root), "--audit-key", str(pub_file)]) == 1


async def test_malformed_packages_are_findings_never_crashes_or_hangs(exported: Path, tmp_path: Path) -> None:
    nulls = _copy(exported, tmp_path / "nulls")
    table = pq.read_table(nulls / pkg.STREAM)
    rows = table.to_pylist()
    rows[1]["data"] = None
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), nulls / pkg.STREAM)
    assert any("null" in p for p in _problems(nulls))

    typed = _copy(exported, tmp_path / "typed")
    pq.write_table(pa.table({"seq": ["1"], "subject": [1], "data": ["x"]}), typed / pkg.STREAM)
    assert any(p.startswith(pkg.STREAM) and "columns" in p for p in _problems(typed))

    fifo = _copy(exported, tmp_path / "fifo")
    (fifo / pkg.REGISTER).unlink()
    os.mkfifo(fifo / pkg.REGISTER)  # reading it would block forever
    assert any(p.startswith(pkg.REGISTER) and "not a regular file" in p for p in _problems(fifo))

    linked = _copy(exported, tmp_path / "linked")
    (linked / pkg.AUDIT / "events" / "day=2000-01-01").symlink_to(tmp_path / "nulls" / pkg.AUDIT / "events")
    assert any("symbolic link" in p for p in _problems(linked))

    badkey = _copy(exported, tmp_path / "badkey")
    register = json.loads((badkey / pkg.REGISTER).read_text())
    register["audit_signer"]["public_key"] = "abc"
    (badkey / pkg.REGISTER).write_text(json.dumps(register))
    assert any(p.startswith(pkg.REGISTER) for p in _problems(badkey))

    late = _copy(exported, tmp_path / "late")
    manifest = json.loads((late / pkg.MANIFEST).read_text())
    manifest["first_seq"] = 5
    (late / pkg.MANIFEST).write_text(json.dumps(manifest))
    assert any("starts at seq 5" in p for p in _problems(late))


async def test_oscal_component_definition_and_assessment_results_validate_with_trestle(
        exported: Path, tmp_path: Path) -> None:
    """FedRAMP and RMF tooling reads them unchanged: trestle's schema models and validators accept both."""
    from enclave_gateway import oscal
    from trestle.oscal.assessment_results import AssessmentResults
    from trestle.oscal.component import ComponentDefinition

    component = ComponentDefinition.oscal_read(exported / oscal.COMPONENT_FILE)
    assert component is not None and oscal.COMPONENT_FILE in json.loads((exported / pkg.MANIFEST).read_text())["files"]
    implemented = {r.control_id for c in component.components for ci in c.control_implementations
                   for r in ci.implemented_requirements}
    assert implemented == {"au-2", "au-3", "au-9.3", "au-10", "au-11", "au-12", "ac-3", "ac-4", "ac-16"}
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    assert cli.main(["evidence", "verify", str(exported), "--oscal", str(good)]) == 0
    tampered = _copy(exported, tmp_path / "p")
    (tampered / pkg.VIOLATIONS_CSV).write_text("")
    assert cli.main(["evidence", "verify", str(tampered), "--oscal", str(bad)]) == 1
    states = {}
    for name, path in (("good", good), ("bad", bad)):
        results = AssessmentResults.oscal_read(path)
        assert results is not None
        states[name] = {f.target.status.state.value for f in results.results[0].findings}
    assert states == {"good": {"satisfied"}, "bad": {"not-satisfied"}}


async def test_a_replay_result_that_is_not_the_streams_is_caught(exported: Path, stack: WorkerSettings,
                                                                tmp_path: Path) -> None:
    root = _copy(exported, tmp_path / "p")
    summary = msgspec.json.decode((root / pkg.REPLAY).read_bytes(), type=pkg.ReplaySummary)
    flattering = msgspec.structs.replace(summary, reproduced=summary.decisions, mismatches=[])
    (root / pkg.REPLAY).write_bytes(msgspec.json.encode(flattering))
    _resign(root, stack.audit_key_file)  # even signed by the real key
    problems = _problems(root)
    assert summary.mismatches == [] or any(p.startswith(pkg.REPLAY) for p in problems), problems
    padded = msgspec.structs.replace(summary, decisions=summary.decisions + 1)
    (root / pkg.REPLAY).write_bytes(msgspec.json.encode(padded))
    _resign(root, stack.audit_key_file)
    assert any(p.startswith(pkg.REPLAY) and "replaying the exported stream" in p for p in _problems(root))


async def test_the_analysts_tables_are_derived_once_and_checked_again(exported: Path, stack: WorkerSettings,
                                                                      tmp_path: Path) -> None:
    from enclave_gateway import audit_sql
    from enclave_gateway.replay import tables

    present = {n.split("/")[1] for n in pkg.listed_files(exported) if n.startswith(f"{pkg.TABLES}/")}
    assert {"requests", "decisions", "invocations", "spend", "violations", "policies"} <= present
    assert all("/day=" in n for n in pkg.listed_files(exported) if n.startswith(f"{pkg.TABLES}/"))
    for name in ("requests", "decisions", "spend", "checkpoints", "policies"):  # the same views for `gateway sql`
        cols, _ = audit_sql.query(Path(stack.data_dir) / "audit", f"SELECT * FROM {name} LIMIT 1")
        assert "seq" in cols and "day" in cols
    root = _copy(exported, tmp_path / "p")
    spend = next(root / n for n in pkg.listed_files(root) if n.startswith(f"{pkg.TABLES}/spend/"))
    rows = pq.read_table(spend).to_pylist()
    rows[0]["charged_micros"] = 0  # where did the budget go? not there
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(spend)), spend)
    _resign(root, stack.audit_key_file)
    assert any(p.startswith(f"{pkg.TABLES}/spend") and "row(s)" in p for p in _problems(root))
    assert set(tables.TABLES) == {"requests", "decisions", "invocations", "spend", "violations", "checkpoints",
                                  "policies"}


async def test_a_period_package_restricts_the_tables_and_still_verifies(stack: WorkerSettings,
                                                                        tmp_path: Path) -> None:
    """`--period`: the analysts' files cover only those days; the stream and its chain stay whole."""
    today = datetime.now(UTC).strftime("%Y-%m")
    for period, expect_rows in (("1999", False), (today, True)):
        out = tmp_path / period
        manifest = await evidence.export(stack, out, period)
        assert manifest.period == period and manifest.first_seq == 1
        report = verify(out)
        assert report.ok, report.findings
        has_tables = any(n.startswith(f"{pkg.TABLES}/") for n in pkg.listed_files(out))
        assert has_tables == expect_rows
        assert ("token_missing" in (out / pkg.VIOLATIONS_CSV).read_text()) == expect_rows
    with pytest.raises(ValueError, match="period"):
        await evidence.export(stack, tmp_path / "bad", "Nov-2026")


async def test_a_package_exported_before_fallbacks_still_verifies_and_replays() -> None:
    """Written once by the code of commit 0fe3964 (RouteSelected and InvocationFailed at v1): an
    assessor's archive keeps verifying after events gain versions, and its decisions replay."""
    golden = Path(__file__).parent / "golden_packages"
    anchor = keys.load_public(golden / "v1-before-fallbacks.audit-signer.pub.json")
    report = verify(golden / "v1-before-fallbacks", anchor)
    assert report.ok and report.anchored and report.events == 64, report.findings
    assert await asyncio.to_thread(cli.main, ["replay", "--package", str(golden / "v1-before-fallbacks")]) == 0


async def test_a_stream_mixing_stored_versions_replays_every_decision() -> None:
    """Issue 11 item 9 (in part): replay over a stream where some requests' events are stored at v1
    (the golden package, before fallbacks) and the others at today's versions, as a stream written
    across an upgrade holds them."""
    from enclave_gateway.replay.engine import replay
    from enclave_gateway.replay_cli import from_package
    from enclave_gateway.schemas import codec, subjects

    stored, jwks, trusted = from_package(Path(__file__).parent / "golden_packages" / "v1-before-fallbacks")
    requests = sorted({e.request_id for _, s, d in stored if (e := _event(d, s)) is not None})
    upgraded = set(requests[::2])  # every other request's events re-written at the current versions
    mixed, rewritten = [], 0
    for seq, subject, data in stored:
        event = _event(data, subject)
        # the requests' entries and authorizations as today's edge and authz write them (their v2 adds
        # only the deadline, none here), decided on by stages whose own facts stay stored at v1
        if (event is not None and event.request_id in upgraded and type(event).__name__ in (
                "RequestSubmitted", "RequestAuthorized") and codec.stored_version(data) < event.schema_version):
            mixed.append((seq, subjects.for_event(event), codec.encode(event)))
            rewritten += 1
        else:
            mixed.append((seq, subject, data))
    versions = {codec.stored_version(d) for _, _, d in mixed}
    assert rewritten > 0 and {1, 2} <= versions
    result = replay(mixed, jwks, trusted=trusted)
    assert result.ok and result.decisions > 0 and result.reproduced == result.decisions, result.mismatches


def _event(data: bytes, subject: str):  # type: ignore[no-untyped-def]
    from enclave_gateway.schemas import codec

    try:
        return codec.decode_event(data, subject)
    except codec.DecodeError:
        return None
