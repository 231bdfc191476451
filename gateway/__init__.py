"""Enclave Gateway: the CLI, the embedded runtime and the dev token issuer.

The root folders `services/`, `schemas/` and `replay/` are installed as subpackages of this one
(`enclave_gateway.services`, ...), see docs/architecture.md §Packaging.
"""

__version__ = "0.1.0"
