"""One registry of identities: every service, operator role and application,
with its durable consumer, what it may publish and subscribe, and the JetStream API calls it needs.

The server configuration (`gateway/nats_auth.py`), the consumers (`bus.ensure_topology`), the
supervisor and the CLI are all derived from this one table, so a permission cannot drift from its
use. Rules the table obeys (each measured on a real nats-server 2.15):

- every permission is an explicit allow list; nats-server reads an *empty* allow list as no
  restriction, so a role that publishes (or subscribes to) nothing is denied `>` instead;
- only `admin` is unrestricted; no runtime role may create, update, delete or purge a stream, nor
  create, fetch from, acknowledge on or delete another role's durable consumer;
- direct gets use the last-by-subject form (`$JS.API.DIRECT.GET.<stream>.<subject>`), scoped to the
  subjects a role reads; the bare form takes any sequence in its body and so reads the whole stream;
- each identity has its own inbox prefix; an application's is `_INBOX_app.<name>`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Literal

import msgspec

from ..schemas import subjects

STREAM = subjects.STREAM
API = "$JS.API"
BUDGET_BUCKET = "GW_BUDGET"  # the budget's projection snapshots (object store)
APP_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ConsumerSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A durable pull consumer on GW_EVENTS; its name is the service's (STYLE §2)."""

    filters: tuple[str, ...]
    ack_wait_s: float = 30.0
    max_ack_pending: int = 10_000


class Identity(msgspec.Struct, frozen=True, kw_only=True):
    """One NATS identity: who it is and exactly what the server lets it do."""

    name: str
    kind: Literal["service", "operator", "application"]
    purpose: str
    consumer: ConsumerSpec | None = None
    publish: tuple[str, ...] = ()  # core and JetStream subjects, JetStream API calls included
    subscribe: tuple[str, ...] = ()  # "subject" or "subject queue"
    deny_publish: tuple[str, ...] = ()
    # The fact subjects whose facts count only with this identity's signature (services/fact_signatures.py)
    signs: tuple[str, ...] = ()
    follows_policy: bool = False
    # May end a request with RequestFailed (after max_deliver); the auditor records, it never fails one.
    fails_requests: bool = False
    unrestricted: bool = False  # admin only

    @property
    def inbox_prefix(self) -> str:
        """Where its request replies, PubAcks and pull deliveries arrive."""
        return (
            subjects.app_inbox(self.name.removeprefix("app.")) if self.kind == "application" else f"_INBOX_{self.name}"
        )


# Terminal facts the edge turns into replies.
TERMINAL = (
    "gw.evt.request.denied.>",
    "gw.evt.budget.rejected.>",
    "gw.evt.route.unavailable.>",
    "gw.evt.invocation.completed.>",
    "gw.evt.invocation.failed.>",
    "gw.evt.request.failed",
)


def own_consumer(name: str) -> tuple[str, ...]:
    """Fetch from and acknowledge on its own durable, nothing else."""
    return (f"{API}.CONSUMER.MSG.NEXT.{STREAM}.{name}", f"$JS.ACK.{STREAM}.{name}.>")


def last_of(subject: str) -> str:
    """The scoped direct get: the newest message on `subject` (a filter may hold wildcards)."""
    return f"{API}.DIRECT.GET.{STREAM}.{subject}"


# the newest activation, and every stored one at start (an ordered consumer of its own on exactly
# the policy subject: junk stored after a valid activation cannot keep a worker from starting)
POLICY_READ = (
    last_of(subjects.policy_activated()),
    f"{API}.CONSUMER.CREATE.{STREAM}.*.{subjects.policy_activated()}",
    f"$JS.FC.{STREAM}.>",
)
FAILS = (subjects.message_rejected(), subjects.request_failed())  # bad bytes; giving up after max_deliver


def _service(
    name: str,
    consumer: ConsumerSpec | None,
    purpose: str,
    *,
    publish: tuple[str, ...] = (),
    subscribe: tuple[str, ...] = (),
    policy: bool = True,
    fails: bool = True,
) -> Identity:
    everything = (*publish, *(FAILS if fails else FAILS[:1]), *(own_consumer(name) if consumer else ()),
                  *(POLICY_READ if policy else ()))
    return Identity(
        name=name,
        kind="service",
        purpose=purpose,
        consumer=consumer,
        publish=everything,
        signs=tuple(s for s in everything if s.startswith(subjects.EVENTS_HEAD)),
        subscribe=(f"_INBOX_{name}.>", *((subjects.policy_activated(),) if policy else ()), *subscribe),
        follows_policy=policy,
        fails_requests=fails,
    )


SERVICES: tuple[Identity, ...] = (
    _service(
        "edge",
        ConsumerSpec(filters=TERMINAL),
        "both entries and the responder: records requests and deliveries, answers callers",
        publish=(
            subjects.request_submitted(),
            "gw.evt.response.>",
            # answers: batch callers on their own inbox (checked per request), HTTP callers on any
            # edge replica's inbox (the replica holding the connection may not be the responder)
            "_INBOX_app.>",
            "_INBOX_edge.>",
            # /readyz: whether each stage's durable has a pull waiting (counts and config, never messages)
            f"{API}.CONSUMER.INFO.{STREAM}.*",
            # /metrics: each team's newest ledger totals and each model's newest route (read, never written)
            last_of("gw.evt.ledger.>"),
            last_of("gw.evt.route.selected.>"),
        ),
        # only as queue group `edge`; and its HTTP callers' streamed tokens (`subjects.chunks_of`)
        subscribe=(f"{subjects.SUBMIT}.* edge", f"{subjects.CHUNK_HEAD}edge.>"),
    ),
    _service(
        "authz",
        ConsumerSpec(filters=(subjects.request_submitted(),)),
        "verifies sessions and decides access; the only service that reads bearer tokens",
        publish=("gw.evt.request.authorized.*", "gw.evt.request.denied.*"),
    ),
    _service(
        "budget",
        ConsumerSpec(
            filters=(
                "gw.evt.request.authorized.>",
                "gw.evt.invocation.>",
                "gw.evt.route.unavailable.>",
                "gw.evt.request.failed",
                "gw.evt.budget.ticked.>",
            )
        ),
        "reserves, settles and releases money on each team's ledger (compare-and-set), and counts rate limits",
        publish=(
            "gw.evt.ledger.*.*",
            "gw.evt.budget.rejected.*",
            "gw.evt.budget.ticked.*",
            subjects.ALL_RATES,  # rate-limit counters (GW_RATES): add and give back, read in the acknowledgement
            last_of("gw.evt.ledger.>"),  # the newest ledger fact of a team: its catch-up read
            last_of("gw.evt.budget.rejected.>"),  # and its newest refusal (a refused request is closed)
            # the projection's rebuild and a long catch-up: its own ephemeral consumers, filtered
            # to the ledger or its refusals (registered durables are denied below), and their flow control; they
            # are never deleted by the budget (nats-py does not), they expire when idle
            f"{API}.CONSUMER.CREATE.{STREAM}.*.gw.evt.ledger.>",
            f"{API}.CONSUMER.CREATE.{STREAM}.*.gw.evt.budget.rejected.>",
            f"$JS.FC.{STREAM}.>",
            # projection snapshots in the object store GW_BUDGET: derived data, never the audit trail
            f"$O.{BUDGET_BUCKET}.>",
            f"{API}.STREAM.INFO.OBJ_{BUDGET_BUCKET}",
            f"{API}.STREAM.PURGE.OBJ_{BUDGET_BUCKET}",
            f"{API}.STREAM.MSG.GET.OBJ_{BUDGET_BUCKET}",
            f"{API}.DIRECT.GET.OBJ_{BUDGET_BUCKET}",
            f"{API}.DIRECT.GET.OBJ_{BUDGET_BUCKET}.>",
            f"{API}.STREAM.NAMES",  # nats-py's object-store reader looks its stream up by subject
        ),
    ),
    _service(
        "router",
        ConsumerSpec(filters=("gw.evt.ledger.reserved.>", "gw.evt.invocation.failed.>")),
        "picks a model endpoint for each reserved request, and the next one when an attempt fails",
        publish=(
            "gw.evt.route.selected.*.*",
            "gw.evt.route.unavailable.*",
            "gw.evt.route.observed.*",  # its changed view of which endpoints an invoker serves
            # readers of its own, whichever replica's share a message was: every route decided
            # (to route a failed attempt on), every failed attempt (the circuit breakers) and every
            # completion (the latency strategy learns each endpoint's; it reads answers it never keeps)
            f"{API}.CONSUMER.CREATE.{STREAM}.*.gw.evt.route.>",
            f"{API}.CONSUMER.CREATE.{STREAM}.*.gw.evt.invocation.failed.>",
            f"{API}.CONSUMER.CREATE.{STREAM}.*.gw.evt.invocation.completed.>",
            # whether any invoker pulls an endpoint's routes (num_waiting): the endpoint's durable is
            # named by the catalog, so any consumer's info (counts and config, never messages)
            f"{API}.CONSUMER.INFO.{STREAM}.*",
        ),
    ),
    _service(
        "invoker",
        None,  # one durable per endpoint, `invoker_durable`: an invoker takes only the routes it serves
        "calls the model servers beside it (the endpoints it hosts) and records the outcome",
        # streamed tokens on the callers' chunk subjects: never a reply subject, so an invoker can
        # add tokens to an answer in flight (whose content it produces anyway), never end or forge one;
        # and the endpoints' durables, whose names the catalog makes (`_pull_any_but_fixed` below)
        publish=("gw.evt.invocation.completed.*", "gw.evt.invocation.failed.*",
                 f"{subjects.CHUNK_HEAD}app.>", f"{subjects.CHUNK_HEAD}edge.>",
                 f"{API}.CONSUMER.MSG.NEXT.{STREAM}.*", f"$JS.ACK.{STREAM}.*.>"),
        policy=False,  # it decides nothing under policy: the route it is handed says where to call
    ),
    _service(
        "auditor",
        ConsumerSpec(filters=(subjects.ALL_EVENTS,), max_ack_pending=50_000),
        "reads every event into the Parquet audit and signs checkpoints of the hash chain",
        publish=(
            subjects.audit_checkpoint(),
            # its own ordered consumers: the whole stream in order (the chain) and the checkpoints
            f"{API}.CONSUMER.CREATE.{STREAM}.*.{subjects.ALL_EVENTS}",
            f"{API}.CONSUMER.CREATE.{STREAM}.*.{subjects.audit_checkpoint()}",
            last_of(subjects.audit_checkpoint()),
            f"$JS.FC.{STREAM}.>",
        ),
        policy=False,
        fails=False,  # a request is never failed by its audit: the auditor records bad bytes, nothing more
    ),
)

OPERATORS: tuple[Identity, ...] = (
    Identity(
        name="admin",
        kind="operator",
        purpose="operator: creates the stream and consumers, activates "
        "signed policy, reads the stream for status and reports",
        unrestricted=True,
        # its own facts only: may write anything on the bus, but signs no stage's decision
        signs=(subjects.policy_activated(), subjects.console_viewed()),
    ),
    Identity(
        name="soc",
        kind="operator",
        purpose="security operations: reads the live violations feed, nothing else",
        subscribe=("gw.evt.request.denied.>",),
    ),
)


def application(app: str) -> Identity:
    """An application's identity (`gateway app add NAME`): submit as itself, read its own inbox."""
    if not APP_NAME.match(app):
        raise ValueError(f"application name {app!r} must be 1-64 of A-Z a-z 0-9 _ -")
    return Identity(
        name=f"app.{app}",
        kind="application",
        purpose=f"application {app}: submits requests and reads its own answers",
        publish=(subjects.submit(app),),
        subscribe=(f"{subjects.app_inbox(app)}.>", f"{subjects.chunks_of(subjects.app_inbox(app))}.>"),
    )


INVOKER_PREFIX = "invoker_"
INVOKER_ACK_WAIT_S = 180.0  # a model call, streamed, may take minutes before its route is acked


def invoker_durable(endpoint: str) -> tuple[str, ConsumerSpec]:
    """The durable of one endpoint's invokers: every replica hosting the endpoint shares it, and
    an invoker hosting several endpoints pulls from each of theirs."""
    return f"{INVOKER_PREFIX}{subjects.token(endpoint)}", ConsumerSpec(filters=(subjects.routes_to(endpoint),),
                                                                        ack_wait_s=INVOKER_ACK_WAIT_S)


def durables(endpoints: Iterable[str] = ()) -> dict[str, ConsumerSpec]:
    """Every durable consumer of GW_EVENTS by name: each service's, and each endpoint's invokers'."""
    fixed = {i.name: i.consumer for i in SERVICES if i.consumer is not None}
    return {**fixed, **dict(invoker_durable(e) for e in sorted(set(endpoints)))}


def fixed() -> tuple[Identity, ...]:
    """Every identity that exists in each deployment (applications are added at run time)."""
    return (*OPERATORS, *SERVICES)


def by_name(name: str, apps: tuple[str, ...] = ()) -> Identity:
    """The identity called `name` (`app.X` for applications)."""
    for ident in (*fixed(), *(application(a) for a in apps)):
        if ident.name == name:
            return ident
    if name.startswith("app."):
        return application(name.removeprefix("app."))
    raise KeyError(name)


def _protected_consumers(endpoints: Iterable[str] = ()) -> tuple[str, ...]:
    """No runtime role may create, update or delete a registered durable, its own included: the
    services' and each endpoint's (`endpoints`: the deployment's, which the auth config is
    regenerated with before each is made, as a durable's name cannot be matched by a prefix)."""
    out: list[str] = []
    for durable in durables(endpoints):
        out += [
            f"{API}.CONSUMER.CREATE.{STREAM}.{durable}",
            f"{API}.CONSUMER.CREATE.{STREAM}.{durable}.>",
            f"{API}.CONSUMER.DURABLE.CREATE.{STREAM}.{durable}",
            f"{API}.CONSUMER.DELETE.{STREAM}.{durable}",
        ]
    return tuple(out)


def _pull_any_but_fixed(ident: Identity) -> tuple[str, ...]:
    """An identity that may pull any durable by name (the invoker: endpoint durables are named by
    the catalog) is still refused every service's own durable: no pull, no ack (ack subjects are
    guessable from sequence numbers)."""
    if f"{API}.CONSUMER.MSG.NEXT.{STREAM}.*" not in ident.publish:
        return ()
    return tuple(s for d in durables() for s in (f"{API}.CONSUMER.MSG.NEXT.{STREAM}.{d}", f"$JS.ACK.{STREAM}.{d}.>"))


def permissions(ident: Identity, endpoints: Iterable[str] = ()) -> dict[str, dict[str, list[str]]] | None:
    """The nats-server `permissions` block of an identity; None (everything) for admin only."""
    if ident.unrestricted:
        return None
    publish: dict[str, list[str]] = (
        {"allow": list(ident.publish), "deny": [*_protected_consumers(endpoints), *_pull_any_but_fixed(ident),
                                                 *ident.deny_publish]}
        if ident.publish
        else {"deny": [">"]}
    )
    subscribe: dict[str, list[str]] = {"allow": list(ident.subscribe)} if ident.subscribe else {"deny": [">"]}
    return {"publish": publish, "subscribe": subscribe}


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` is one token, `>` one or more trailing tokens."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


def may_publish(ident: Identity, subject: str, endpoints: Iterable[str] = ()) -> bool:
    """What the server configuration derived from this registry allows (deny wins)."""
    perms = permissions(ident, endpoints)
    if perms is None:
        return True
    pub = perms["publish"]
    if any(matches(d, subject) for d in pub.get("deny", [])):
        return False
    return any(matches(a, subject) for a in pub.get("allow", []))


def may_subscribe(ident: Identity, subject: str, queue: str | None = None) -> bool:
    """Whether the derived configuration lets the identity subscribe (with that queue group)."""
    perms = permissions(ident)
    if perms is None:
        return True
    for entry in perms["subscribe"].get("allow", []):
        pattern, _, q = entry.partition(" ")
        if matches(pattern, subject) and (not q or q == queue):
            return True
    return False


__all__ = [
    "OPERATORS",
    "SERVICES",
    "ConsumerSpec",
    "Identity",
    "application",
    "by_name",
    "durables",
    "fixed",
    "matches",
    "may_publish",
    "may_subscribe",
    "permissions",
]


def markdown_table(idents: tuple[Identity, ...] | None = None) -> str:
    """The registry as the Markdown table docs/security.md carries (a test keeps the two equal)."""
    rows = ["| identity | kind | purpose | consumer | may publish | may subscribe |", "|---|---|---|---|---|---|"]
    for ident in idents or (*fixed(), application("NAME")):
        perms = permissions(ident)
        if perms is None:
            pub = sub = "everything"
        else:
            pub = "<br>".join(f"`{s}`" for s in perms["publish"].get("allow", [])) or "nothing (deny `>`)"
            sub = "<br>".join(f"`{s}`" for s in perms["subscribe"].get("allow", [])) or "nothing (deny `>`)"
        consumer = f"`{ident.name}`" if ident.consumer else "-"
        rows.append(f"| `{ident.name}` | {ident.kind} | {ident.purpose} | {consumer} | {pub} | {sub} |")
    return "\n".join(rows) + "\n"
