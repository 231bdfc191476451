"""OSCAL for assessors' tools (issue 9 item 7): the register as a component definition and a
verification as assessment results, built and validated with compliance-trestle (OSCAL 1.2.1).

Trestle is imported only inside these functions (about 0.5 s), never at CLI start. Facts that
shaped this module are in ../shared/notes/oscal-trestle.md: control ids in catalog form (`au-9.3`),
uuid4 strings, timezone-aware times, `ns` on every custom prop, a `status` on every finding target,
no empty lists.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .validation_doc import CONTROLS

CATALOG = "https://doi.org/10.6028/NIST.SP.800-53r5"  # a name for the catalog: never fetched
NS = "https://enclave-gateway.invalid/ns/oscal"  # our own prop namespace (an .invalid host: never resolved)
COMPONENT_FILE = "oscal/component-definition.json"


def control_id(label: str) -> str:
    """`AU-9(3)` in catalog form: `au-9.3`."""
    return label.lower().replace("(", ".").replace(")", "")


def _metadata(title: str, now: datetime) -> Any:
    from trestle.oscal import OSCAL_VERSION
    from trestle.oscal.common import Metadata

    return Metadata(title=title, last_modified=now, version="1.0", oscal_version=OSCAL_VERSION)


def component_definition(register: dict[str, Any], now: datetime) -> Any:
    """The gateway as one software component implementing the controls the package evidences."""
    from trestle.oscal.common import Property
    from trestle.oscal.component import (
        ComponentDefinition,
        ControlImplementation,
        DefinedComponent,
        ImplementedRequirement,
    )

    props = [Property(name="audit-signer", value=str(register["audit_signer"]["kid"]), ns=NS)]
    if register.get("policy_in_force"):
        props.append(Property(name="policy-in-force", value=str(register["policy_in_force"]), ns=NS))
    requirements = [
        ImplementedRequirement(uuid=str(uuid.uuid4()), control_id=control_id(label), description=f"{asks}. "
                               f"Evidence in the package: {where}.")
        for label, asks, where in CONTROLS
    ]
    component = DefinedComponent(
        uuid=str(uuid.uuid4()),
        type="software",
        title=str(register["system"]),
        description="AI gateway in front of self-hosted models: attribute-based access control with "
                    "classification, hard spend caps, routing, and an immutable, replayable audit trail.",
        props=props,
        control_implementations=[ControlImplementation(
            uuid=str(uuid.uuid4()), source=CATALOG, description="NIST SP 800-53 rev5 controls evidenced by the "
            "gateway's evidence package", implemented_requirements=requirements)],
    )
    return ComponentDefinition(uuid=str(uuid.uuid4()), metadata=_metadata(f"{register['system']} component", now),
                               components=[component])


def assessment_results(findings: list[tuple[str, str]], summary: str, package: str, now: datetime) -> Any:
    """One result: the offline verification of a package, a finding per failed check (none: satisfied)."""
    from trestle.oscal.assessment_results import AssessmentResults, ImportAp, Result
    from trestle.oscal.common import (
        ControlSelections,
        Finding,
        FindingTarget,
        ObjectiveStatus,
        Observation,
        ReviewedControls,
        SelectControlById,
    )

    observation = Observation(uuid=str(uuid.uuid4()), title="gateway evidence verify", description=summary,
                              methods=["TEST"], collected=now)
    state = "not-satisfied" if findings else "satisfied"
    targets = [(where, problem) for where, problem in findings] or [("package", "every check passed")]
    result_findings = [
        Finding(uuid=str(uuid.uuid4()), title=f"{where}"[:200], description=problem,
                target=FindingTarget(type="objective-id", target_id=control_id("AU-9(3)"),
                                     status=ObjectiveStatus(state=state)),
                related_observations=None)
        for where, problem in targets
    ]
    selected = [SelectControlById(control_id=control_id(label)) for label, _, _ in CONTROLS]
    result = Result(uuid=str(uuid.uuid4()), title=f"Verification of evidence package {Path(package).name}",
                    description=summary, start=now, end=now,
                    reviewed_controls=ReviewedControls(control_selections=[ControlSelections(
                        include_controls=selected)]),
                    observations=[observation], findings=result_findings)
    return AssessmentResults(uuid=str(uuid.uuid4()), metadata=_metadata("Evidence package verification", now),
                             import_ap=ImportAp(href="#no-assessment-plan"), results=[result])


def write_validated(model: Any, path: Path) -> Path:
    """Write an OSCAL model, read it back through trestle's schema models and its validators."""
    from argparse import Namespace

    from trestle.core.validator_factory import validator_factory

    path.parent.mkdir(parents=True, exist_ok=True)
    model.oscal_write(path)
    again = type(model).oscal_read(path)
    if again is None or not validator_factory.get(Namespace(mode="all")).model_is_valid(again, quiet=True):
        raise ValueError(f"{path}: not valid OSCAL")
    return path


def now_utc() -> datetime:
    """Trestle wants timezone-aware times; it writes milliseconds."""
    return datetime.now(UTC).replace(microsecond=0)
