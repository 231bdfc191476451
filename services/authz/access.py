"""The access rules of the policy bundle, compiled by casbin once per policy version (DESIGN §3).

`team-model-access` is the `p` table; the lattice rules are the `p2` lines, each naming its id
and matcher, checked in the bundle's order. casbin's enforce is synchronous, so it is atomic
within one event loop; it is never run from threads (shared/notes/abac-casbin.md).
"""

from __future__ import annotations

import casbin
from casbin.core_enforcer import EnforceContext
from casbin.persist.adapters.string_adapter import StringAdapter

from ...schemas.labels import UNCLASSIFIED, Label, dominates
from ...schemas.policy import PolicyBundle

TEAM_MODEL_ACCESS = "team-model-access"
DECIDED_MEMORY = 100_000  # distinct (caller attributes, model, labels) remembered per compiled policy
MANDATORY = ("clearance-dominates-input", "accreditation-dominates-input", "no-write-down")


class AccessError(ValueError):
    """The access rules cannot be compiled or lack a mandatory rule."""


class AccessRules:
    """A compiled enforcer for one policy version."""

    def __init__(self, bundle: PolicyBundle) -> None:
        self.version = bundle.version
        try:
            model = casbin.Enforcer.new_model(text=bundle.access_model)
            self._enforcer = casbin.Enforcer(model, StringAdapter(bundle.access_policy))
            self._decided: dict[tuple[object, ...], str | None] = {}
            self._enforcer.add_function("dominates", dominates)
            lines = self._enforcer.get_named_policy("p2")
        except Exception as exc:  # casbin raises TypeError/RuntimeError/SyntaxError for bad files
            raise AccessError(f"access rules do not compile: {exc!r}") from exc
        self.lattice: list[tuple[str, EnforceContext]] = [
            (rule, EnforceContext("r", "p2", "e", matcher)) for rule, matcher in (tuple(x[:2]) for x in lines)
        ]
        missing = [r for r in MANDATORY if r not in {rule for rule, _ in self.lattice}]
        if missing:
            raise AccessError(f"access policy lacks mandatory rule(s): {', '.join(missing)}")
        self._probe()

    def _probe(self) -> None:
        """casbin reports some errors only when a matcher first runs: run each once now."""
        sub = {"principals": ("probe",), "label": UNCLASSIFIED}
        obj = {"model": "probe", "input": UNCLASSIFIED, "output": UNCLASSIFIED, "accreditation": UNCLASSIFIED}
        try:
            self._enforcer.enforce(sub, obj)
            for _, ctx in self.lattice:
                self._enforcer.enforce(ctx, sub, obj)
        except Exception as exc:
            raise AccessError(f"access rules fail on a probe request: {exc!r}") from exc

    def may_use(self, principals: tuple[str, ...], model_id: str) -> bool:
        """The team/role table alone (what a caller may see listed); an evaluation error refuses."""
        try:
            return bool(
                self._enforcer.enforce(
                    {"principals": principals, "label": UNCLASSIFIED},
                    {"model": model_id, "input": UNCLASSIFIED, "output": UNCLASSIFIED, "accreditation": UNCLASSIFIED},
                )
            )
        except Exception:  # fail closed
            return False

    def first_denial(
        self,
        principals: tuple[str, ...],
        clearance: Label,
        model_id: str,
        accreditation: Label,
        input_label: Label,
        output_label: Label,
    ) -> str | None:
        """The id of the first rule that refuses, or None; an evaluation error refuses (fail closed).

        Memoized per compiled policy: the answer depends on these arguments and the rules alone, and
        casbin re-parses every matcher on every call (about 0.3 ms each, four per decision).
        """
        key = (principals, clearance, model_id, accreditation, input_label, output_label)
        if key in self._decided:
            return self._decided[key]
        denial, clean = self._first_denial(*key)
        if clean:  # a refusal caused by an evaluation error is never remembered
            if len(self._decided) >= DECIDED_MEMORY:
                self._decided.clear()  # bounded: callers with ever-new attributes cannot grow it without end
            self._decided[key] = denial
        return denial

    def _first_denial(
        self,
        principals: tuple[str, ...],
        clearance: Label,
        model_id: str,
        accreditation: Label,
        input_label: Label,
        output_label: Label,
    ) -> tuple[str | None, bool]:
        sub = {"principals": principals, "label": clearance}
        obj = {"model": model_id, "input": input_label, "output": output_label, "accreditation": accreditation}
        for rule, ctx in ((TEAM_MODEL_ACCESS, None), *self.lattice):
            try:
                allowed = self._enforcer.enforce(sub, obj) if ctx is None else self._enforcer.enforce(ctx, sub, obj)
            except Exception:  # a broken rule must never allow
                return rule, False
            if not allowed:
                return rule, True
        return None, True
