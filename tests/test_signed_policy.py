"""Signed policy (issue 8 item 5): write access to the policy subject is not enough to change a
decision. Unsigned, untrusted and tampered activations are refused by every worker, and the
request that was forbidden stays forbidden."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
from enclave_gateway import cli, policy_admin, runtime
from enclave_gateway.schemas import codec, subjects
from enclave_gateway.schemas.commands import ChatBody, ChatMessage, SubmitRequest
from enclave_gateway.schemas.events import PolicyActivated
from enclave_gateway.services import bus
from enclave_gateway.services.policy import PolicyError, digest, read_files, sign_digest
from enclave_gateway.services.policy.feed import PolicyFeed, compile_activation
from enclave_gateway.services.policy.signing import load_private
from enclave_gateway.services.settings import WorkerSettings
from enclave_gateway.services.worker import whole_bundle
from nats.aio.client import Client

from .conftest import APP, wait_for_event

ROOT = Path(__file__).resolve().parent.parent
GRANT = "p, team:tight, analyst-large\n"  # what a hostile activation tries to add


def _signed(files: dict[str, str], key: Path, *, claimed: dict[str, str] | None = None,
            signer: str | None = None, at: datetime | None = None) -> PolicyActivated:
    """An activation of `files`, signed over `claimed` (default: the same files) with `key`."""
    sig = sign_digest(load_private(key), digest(claimed or files), at or datetime.now(UTC))
    version = "sha256:" + digest(files)[:16]
    return PolicyActivated(event_id=f"forged-{os.urandom(4).hex()}:activate", request_id="forged",
                           occurred_at=datetime.now(UTC), policy_version=version, version=version,
                           sha256=digest(files), activated_by="mallory", files=files,
                           signature=sig.signature, signer=signer or sig.kid, signed_at=sig.signed_at)


@pytest.fixture(scope="module")
def signers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two signing keys, A and B, and an untrusted one, M."""
    d = tmp_path_factory.mktemp("signers")
    for name in ("a", "b", "m"):
        policy_admin.keygen(d / name)
    return {n: d / f"{n}.key" for n in ("a", "b", "m")}


def _trust(*keys: Path) -> dict[str, str]:
    return policy_admin.trusted([k.with_name(k.name.removesuffix(".key") + ".pub.json") for k in keys])


def test_keygen_writes_a_private_key_only_its_owner_reads(signers: dict[str, Path]) -> None:
    assert stat.S_IMODE(signers["a"].stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        policy_admin.keygen(signers["a"].with_suffix(""))


def test_signer_rotation_and_every_refusal(signers: dict[str, Path]) -> None:
    files = read_files(ROOT / "policies")
    a, b, m = signers["a"], signers["b"], signers["m"]
    both, only_b = _trust(a, b), _trust(b)
    assert compile_activation(_signed(files, a), both, whole_bundle).version.startswith("sha256:")
    assert compile_activation(_signed(files, b), both, whole_bundle)
    assert compile_activation(_signed(files, b), only_b, whole_bundle)
    with pytest.raises(PolicyError, match="not trusted"):  # A rotated out
        compile_activation(_signed(files, a), only_b, whole_bundle)
    with pytest.raises(PolicyError, match="not trusted"):
        compile_activation(_signed(files, m), both, whole_bundle)
    granted = {**files, "access_policy.csv": files["access_policy.csv"] + GRANT}
    with pytest.raises(PolicyError, match="does not match"):  # signed the original, carries the grant
        compile_activation(msgspec.structs.replace(_signed(files, a), files=granted), both, whole_bundle)
    with pytest.raises(PolicyError, match="does not cover"):  # self-consistent digest, signature over another
        compile_activation(_signed(granted, a, claimed=files), both, whole_bundle)
    with pytest.raises(PolicyError, match="does not cover"):  # A's signature presented as B's
        compile_activation(_signed(files, a, signer=_signed(files, b).signer), both, whole_bundle)
    with pytest.raises(PolicyError, match="unsigned"):
        compile_activation(msgspec.structs.replace(_signed(files, a), signature=None), both, whole_bundle)
    with pytest.raises(PolicyError, match="does not cover"):  # the signing time is signed too
        compile_activation(msgspec.structs.replace(_signed(files, a), signed_at="2030-01-01T00:00:00+00:00"),
                           both, whole_bundle)
    with pytest.raises(PolicyError, match="may hold admission.toml; this one holds .*extra.csv"):
        extra = {**files, "extra.csv": "p, team:tight, analyst-large"}
        compile_activation(_signed(extra, a), both, whole_bundle)


def _ask(token: str) -> bytes:
    chat = ChatBody(model="analyst-large", messages=(ChatMessage(role="user", content="may I?"),), max_tokens=4)
    return codec.encode(SubmitRequest(token=token, chat=chat))


async def _forbidden(client: Client, admin: Client, token: str) -> str:
    """tight asks for analyst-large: denied by team-model-access; returns the policy version used."""
    reply = codec.decode_reply((await client.request(subjects.submit(APP), _ask(token), timeout=30)).data)
    assert reply.error is not None and reply.error.rule == "team-model-access", reply
    denied = await wait_for_event(admin, reply.request_id, "RequestDenied")
    return str(denied["policy_version"])


async def test_unsigned_untrusted_or_tampered_activations_change_no_decision(
        admin: Client, client: Client, stack: WorkerSettings, token_for, signers: dict[str, Path],
        tmp_path: Path) -> None:
    token = token_for("tight")
    version = await _forbidden(client, admin, token)
    trusted_key = runtime.dev_signing_key(stack)
    assert trusted_key is not None
    files = read_files(Path(stack.policy_dir))
    granted = {**files, "access_policy.csv": files["access_policy.csv"] + GRANT}
    older = datetime(2026, 1, 1, tzinfo=UTC)  # before anything active: a replay of an old signed bundle
    forged = [
        _signed(granted, trusted_key, at=older),  # validly signed by the trusted key, but older
        msgspec.structs.replace(_signed(granted, trusted_key), signature=None, signer=None),  # unsigned
        _signed(granted, signers["m"]),  # a key nobody pinned
        _signed(granted, trusted_key, claimed=files),  # the trusted key's signature over other content
        msgspec.structs.replace(_signed(files, trusted_key), files=granted),  # signed files swapped
    ]
    js = admin.jetstream()
    for event in forged:  # admin may publish the subject: the signature is what stops it
        await bus.publish(js, event)
    await asyncio.sleep(0.5)
    assert await _forbidden(client, admin, token) == version
    # junk stored on the subject by the server itself (a pull request whose reply subject is the
    # policy subject: any service credential can make the server do that)
    await js.publish(subjects.policy_activated(), b"", headers={"Nats-Pending-Messages": "50"})
    # a fresh replica starting now reads every activation, refuses the forged ones and the junk,
    # and decides under the valid one the running workers use
    feed = PolicyFeed(admin, js, "late-replica", whole_bundle, stack.policy_signers)
    await feed.start(timeout_s=10.0)
    assert feed.version == version and feed.refused >= len(forged) + 1
    active = await runtime.active_policy(stack)  # operator tooling selects as the workers do
    assert active is not None and active.version == version
    # the CLI refuses an untrusted signature before publishing anything
    folder = tmp_path / "bundle"
    shutil.copytree(stack.policy_dir, folder)
    (folder / "access_policy.csv").write_text(granted["access_policy.csv"])
    assert cli.main(["policy", "sign", "--key", str(signers["m"]), "--dir", str(folder)]) == 0
    assert await asyncio.to_thread(cli.main, ["policy", "activate", "--dir", str(folder), "--data-dir", stack.data_dir]) == 1
    assert await _forbidden(client, admin, token) == version
    # restore: the signed, trusted policy is the newest again (later tests and restarts read it)
    await runtime.activate(stack, Path(stack.policy_dir), "test-restore")


async def test_an_older_signature_is_refused_by_the_cli_and_a_replay_by_the_workers(
        admin: Client, client: Client, stack: WorkerSettings, token_for, tmp_path: Path) -> None:
    """Sign A, sign B, activate B: activating A afterwards is a rollback, refused until A is signed again."""
    key = runtime.dev_signing_key(stack)
    assert key is not None
    token = token_for("tight")
    first, second = tmp_path / "a", tmp_path / "b"
    shutil.copytree(stack.policy_dir, first)
    shutil.copytree(stack.policy_dir, second)
    (second / "access_policy.csv").write_text((second / "access_policy.csv").read_text() + GRANT)
    assert cli.main(["policy", "sign", "--key", str(key), "--dir", str(first)]) == 0
    assert cli.main(["policy", "sign", "--key", str(key), "--dir", str(second)]) == 0
    old = policy_admin.activation(first, "replayer", datetime.now(UTC), stack.policy_signers)
    granted = await runtime.activate(stack, second, "test")
    try:
        await asyncio.sleep(0.5)
        reply = codec.decode_reply((await client.request(subjects.submit(APP), _ask(token), timeout=30)).data)
        assert reply.error is None or reply.error.rule != "team-model-access"  # B grants it
        assert await asyncio.to_thread(cli.main, ["policy", "activate", "--dir", str(first), "--data-dir", stack.data_dir]) == 1
        await bus.publish(admin.jetstream(), old)  # the replay itself, past the CLI
        await asyncio.sleep(0.5)
        reply = codec.decode_reply((await client.request(subjects.submit(APP), _ask(token), timeout=30)).data)
        assert reply.error is None or reply.error.rule != "team-model-access"  # still B
        denied_or_ok = await wait_for_event(admin, reply.request_id, "RequestAuthorized")
        assert denied_or_ok["policy_version"] == granted.version
    finally:
        await runtime.activate(stack, Path(stack.policy_dir), "test-restore")


async def test_a_pinned_second_signer_is_followed_only_where_it_is_pinned(
        admin: Client, client: Client, stack: WorkerSettings, token_for, signers: dict[str, Path],
        tmp_path: Path) -> None:
    """Rotation: replicas that pin B switch to B's bundle; the running workers, which pin only the
    dev signer, refuse it and keep deciding under the active policy."""
    folder = tmp_path / "bundle-b"
    shutil.copytree(stack.policy_dir, folder)
    (folder / "access_policy.csv").write_text((folder / "access_policy.csv").read_text() + GRANT)
    assert cli.main(["policy", "sign", "--key", str(signers["b"]), "--dir", str(folder)]) == 0
    both = {**stack.policy_signers, **_trust(signers["b"])}
    js = admin.jetstream()
    rotated = PolicyFeed(admin, js, "pins-b", whole_bundle, both)
    await rotated.start()
    token = token_for("tight")
    version = await _forbidden(client, admin, token)
    event = policy_admin.activation(folder, "rotation-test", datetime.now(UTC), both)
    assert event.signer == _signed({}, signers["b"]).signer
    await bus.publish(js, event)
    for _ in range(50):
        if rotated.version == event.version:
            break
        await asyncio.sleep(0.1)
    assert rotated.version == event.version
    assert await _forbidden(client, admin, token) == version
    await runtime.activate(stack, Path(stack.policy_dir), "test-restore")


async def test_a_replica_whose_first_read_of_the_policy_was_stale_still_starts(
        stack: WorkerSettings, admin: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a replicated stream a direct get may be answered by a follower that has not stored the
    newest activation yet, and that activation was published before the replica subscribed: the
    replica must read again rather than wait for an activation that will never come live."""
    from enclave_gateway.services.policy import feed as feed_module
    reads: list[int] = []

    async def stale_once(js: object, subject: str, reader: str) -> list[tuple[bytes, str, int, dict[str, str] | None]]:
        reads.append(1)
        return [] if len(reads) == 1 else await bus.stored_with_headers(admin.jetstream(), subject, reader)

    monkeypatch.setattr(feed_module, "stored_with_headers", stale_once)
    feed = PolicyFeed(admin, admin.jetstream(), "stale-replica", whole_bundle, stack.policy_signers)
    await feed.start(timeout_s=10.0)
    active = await runtime.active_policy(stack)
    assert active is not None and feed.version == active.version and len(reads) >= 2
