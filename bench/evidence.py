"""Replay and evidence verification throughput (DESIGN §8: replay >= 50,000 events/s re-decided;
`evidence verify` of 1,000,000 events in under a minute), on a synthetic but valid stream.

The generator runs the real deciders (edge, authz, budget, router) for each request, so every
decision in the stream is one replay must reproduce; the invoker's answer is synthesized (an
observation). It then writes a signed evidence package, replays the stream and verifies the
package, and prints the figures, ending with one line of JSON.

Usage: .venv/bin/python bench/evidence.py [--events N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
from enclave_gateway import issuer, policy_admin
from enclave_gateway.evidence import STREAM_SCHEMA, replay_summary
from enclave_gateway.replay import package as pkg
from enclave_gateway.replay import tables
from enclave_gateway.replay.engine import replay
from enclave_gateway.replay.verify import verify
from enclave_gateway.schemas import codec, subjects
from enclave_gateway.schemas.commands import ChatBody, ChatMessage, Completion, SubmitReply, SubmitRequest, Usage
from enclave_gateway.schemas.events import (
    AnyEvent,
    BudgetReserved,
    InvocationCompleted,
    PolicyActivated,
    RequestAuthorized,
    envelope,
)
from enclave_gateway.services import keys
from enclave_gateway.services.auditor import checkpoints
from enclave_gateway.services.auditor.decider import AuditorState, row_for
from enclave_gateway.services.auditor.parquet_sink import SCHEMA, VIOLATION_SCHEMA
from enclave_gateway.services.authz import decider as authz
from enclave_gateway.services.authz.policy_view import compile_view
from enclave_gateway.services.budget import decider as budget
from enclave_gateway.services.edge import decider as edge
from enclave_gateway.services.policy import bundle_from_files, read_files
from enclave_gateway.services.router import decider as router

ROOT = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)
TEAMS = "\n[teams.bench]\ncap_micros = 1_000_000_000_000\nperiod = \"month\"\n"


def generate(events: int, work: Path) -> tuple[list[tuple[int, str, bytes, datetime]], str, dict[str, str]]:
    """(seq, subject, data, stored_at) for about `events` messages, the dev issuer's JWKS, the signer pins."""
    folder = work / "policies"
    shutil.copytree(ROOT / "policies", folder)
    with open(folder / "budgets.toml", "a") as f:
        f.write(TEAMS)
    with open(folder / "access_policy.csv", "a") as f:
        f.write("p, team:bench, enclave-tiny\n")
    keys_dir = work / "keys"
    issuer.ensure_keys(keys_dir)
    jwks = (keys_dir / "issuer.jwks.json").read_text()
    _, signer, _ = policy_admin.dev_signer(keys_dir)
    activation = policy_admin.activation(folder, "bench", T0, {signer.kid: signer.public_key},
                                         keys_dir / "policy-signer.key")
    bundle = bundle_from_files(read_files(folder))
    view = compile_view(bundle, [jwks])
    # a day: the policy bounds sessions at that, and a million requests 10 ms apart take under three hours
    token = issuer.issue(keys_dir, subject="bench", team="bench", ttl_s=24 * 3600, now=int(T0.timestamp()))
    out: list[tuple[int, str, bytes, datetime]] = []

    def put(event: AnyEvent, at: datetime) -> None:
        out.append((len(out) + 1, subjects.for_event(event), codec.encode(event), at))

    put(activation, T0)
    state = budget.initial_state()
    i = 0
    while len(out) < events:
        i += 1
        now = T0 + timedelta(milliseconds=10 * i)
        chat = ChatBody(model="enclave-tiny", messages=(ChatMessage(role="user", content=f"request {i}"),),
                        max_tokens=4)
        submitted = edge.submitted(f"r{i:09d}", "nats", SubmitRequest(token=token, chat=chat),
                                   f"_INBOX_app.bench.{i}", now, bundle.version)
        put(submitted, now)
        [authorized] = authz.decide(submitted, authz.initial_state(), view, now)
        assert isinstance(authorized, RequestAuthorized)
        put(authorized, now)
        for fact in budget.decide(authorized, state, bundle, now):
            state = budget.evolve(state, fact)
            put(fact, now)
        reserved = codec.decode_as(out[-1][2], BudgetReserved)
        [route] = router.decide(reserved, router.initial_state(), bundle, now)
        put(route, now)
        completed = InvocationCompleted(**envelope(submitted.request_id, "invoke", now, bundle.version),
                                        caller=authorized.caller, model_id="enclave-tiny", endpoint="local-llama",
                                        prompt_tokens=12, completion_tokens=4, finish_reason="length",
                                        content="o o o o", latency_ms=3.0, reservation=route.reservation,  # type: ignore[union-attr]
                                        reply_to=submitted.reply_to)
        put(completed, now)
        for fact in budget.decide(completed, state, bundle, now):
            state = budget.evolve(state, fact)
            put(fact, now)
        reply = SubmitReply(request_id=submitted.request_id, completion=Completion(
            model="enclave-tiny", content="o o o o", finish_reason="length",
            usage=Usage(prompt_tokens=12, completion_tokens=4), reserved_micros=reserved.amount_micros))
        put(edge.delivered(reply, "bench", now, bundle.version), now)
    return out, jwks, {signer.kid: signer.public_key}


def write_package(stored: list[tuple[int, str, bytes, datetime]], jwks: str, signers: dict[str, str], root: Path,
                  audit_key: Path) -> None:
    """A signed evidence package of `stored`, with a checkpoint every 1,000 messages."""
    key = keys.ensure_key(audit_key)
    public = keys.public_of(key)
    cursor, rows, state, with_cps = checkpoints.Cursor(), [], AuditorState(), []
    for _, subject, data, at in stored:  # checkpoints are messages too: renumber as they are inserted
        with_cps.append((len(with_cps) + 1, subject, data, at))
        cursor = checkpoints.advance(cursor, len(with_cps), subject, data)
        if checkpoints.due(cursor, 1000, 0.0, 3600.0):
            cp = checkpoints.checkpoint(cursor, public.kid, keys.sign(key, checkpoints.unsigned(cursor)), at)
            cursor = checkpoints.vouched(cursor, cp)
            data = codec.encode(cp)
            with_cps.append((len(with_cps) + 1, subjects.audit_checkpoint(), data, at))
            cursor = checkpoints.advance(cursor, len(with_cps), subjects.audit_checkpoint(), data)
    stored[:] = with_cps
    head = "0" * 64
    for seq, subject, data, at in stored:
        row, state = row_for(state, seq, subject, data, at, b"bench-digest-key-0123456789abcdef")
        rows.append(row)
        head = row.chain_hash
    root.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"seq": s, "subject": sub, "stored_at": at, "data": d}
                                         for s, sub, d, at in stored], schema=STREAM_SCHEMA), root / pkg.STREAM)
    (root / pkg.AUDIT / "events" / "day=2026-11-28").mkdir(parents=True)
    records = msgspec.to_builtins(rows, builtin_types=(datetime,))
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in SCHEMA.names} for r in records], schema=SCHEMA),
                   root / pkg.AUDIT / "events" / "day=2026-11-28" / "seq-all.parquet")
    con = duckdb.connect()
    con.execute(f"CREATE VIEW events AS SELECT * FROM read_parquet('{root / pkg.AUDIT}/events/day=*/*.parquet', "
                "hive_partitioning=false)")
    tables.write(con, root / pkg.TABLES)  # the analysts' tables, from their one definition
    con.close()
    pq.write_table(VIOLATION_SCHEMA.empty_table(), root / pkg.VIOLATIONS_PARQUET)
    (root / pkg.VIOLATIONS_CSV).write_text("seq,request_id,rule,reason\n")
    cps = [codec.decode_as(d, checkpoints.AuditCheckpoint, s) for _, s, d, _ in stored
           if s == subjects.audit_checkpoint()]
    (root / pkg.CHECKPOINTS).write_bytes(msgspec.json.encode(cps))
    plain = [(s, sub, d) for s, sub, d, _ in stored]
    (root / pkg.REPLAY).write_bytes(msgspec.json.encode(replay_summary(plain, [jwks])))
    act = codec.decode_as(stored[0][2], PolicyActivated, stored[0][1])
    catalog = pkg.catalog_entries(bundle_from_files(act.files))
    register = {"system": "Enclave Gateway (bench)", "audit_signer": msgspec.to_builtins(public),
                "policy_signers": signers, "policy_in_force": act.version,
                "policies": msgspec.to_builtins(pkg.policy_history([(stored[0][2], stored[0][1], 1)])),
                "catalog": catalog, "token_issuers": None, "dev_token_issuer": json.loads(jwks)}
    (root / pkg.REGISTER).write_bytes(msgspec.json.encode(register))
    manifest = pkg.Manifest(system="bench", exported_at=T0.isoformat(), first_seq=1, last_seq=len(stored),
                            events=len(stored), chain_head=pkg.ChainHead(seq=len(stored), head=head),
                            files={n: pkg.file_entry(root / n) for n in pkg.listed_files(root)})
    raw = msgspec.json.encode(manifest)
    (root / pkg.MANIFEST).write_bytes(raw)
    sig = pkg.ManifestSignature(kid=public.kid, signature=keys.sign(key, pkg.signing_message(raw)))
    (root / pkg.MANIFEST_SIG).write_bytes(msgspec.json.encode(sig))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=100_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        stored, jwks, signers = generate(args.events, work)
        generated_s = time.perf_counter() - t
        plain = [(s, sub, d) for s, sub, d, _ in stored]
        t = time.perf_counter()
        result = replay(plain, [jwks])
        replay_s = time.perf_counter() - t
        assert result.ok, result.mismatches[:3]
        write_package(stored, jwks, signers, work / "package", work / "audit-signer.key")
        anchor = keys.load_public(work / "audit-signer.pub.json")
        t = time.perf_counter()
        report = verify(work / "package", anchor)
        verify_s = time.perf_counter() - t
        assert report.ok, report.findings[:3]
        n = len(stored)
        figures = {
            "events": n,
            "decisions": result.decisions,
            "generate_s": round(generated_s, 2),
            "replay_events_per_s": round(len(plain) / replay_s),
            "replay_decisions_per_s": round(result.decisions / replay_s),
            "verify_s": round(verify_s, 2),
            "verify_events_per_s": round(n / verify_s),
            "verify_1m_projected_s": round(1_000_000 / (n / verify_s), 1),
            "package_bytes": sum(p.stat().st_size for p in (work / "package").rglob("*") if p.is_file()),
        }
        digest = hashlib.sha256(json.dumps(figures, sort_keys=True).encode()).hexdigest()[:8]
        for k, v in figures.items():
            print(f"{k:26} {v}")
        print(json.dumps({**figures, "run": digest}))


if __name__ == "__main__":
    main()
