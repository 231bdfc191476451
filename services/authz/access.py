"""Team/role -> model rules evaluated by casbin (DESIGN §3), built once per policy version.

casbin's enforce is synchronous, so it is atomic within one event loop; it is never run from
threads (shared/notes/abac-casbin.md: SystemError from ast.parse under threads).
"""

import casbin
from casbin.persist.adapters.string_adapter import StringAdapter

from ...schemas.policy import PolicyBundle


class AccessRules:
    """A compiled casbin enforcer for one policy version."""

    def __init__(self, bundle: PolicyBundle) -> None:
        self.version = bundle.version
        model = casbin.Enforcer.new_model(text=bundle.access_model)
        self._enforcer = casbin.Enforcer(model, StringAdapter(bundle.access_policy))

    def allows(self, principals: tuple[str, ...], model_id: str) -> bool:
        """Whether any principal may use the model; an evaluation error is a deny."""
        try:
            return bool(self._enforcer.enforce({"principals": principals}, model_id))
        except Exception:  # fail closed: a broken rule must never allow
            return False
