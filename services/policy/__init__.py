"""The policy bundle as one package (issue 8): its files and digest, its signature, its
structural validation, and the feed that follows activations on the stream.

Nothing here knows how a service decides: authz, budget, router and edge each compile their own
view of a verified bundle (`PolicyFeed(view=...)`), so no worker builds rules it never uses.
"""

from ..keys import SignerKey
from .bundle import FILES, PolicyError, bundle_from_files, digest, load_bundle, read_files
from .signing import SIGNATURE_FILE, BundleSignature, TrustedSigners, sign_digest, verify_activation

__all__ = [
    "FILES",
    "SIGNATURE_FILE",
    "BundleSignature",
    "PolicyError",
    "SignerKey",
    "TrustedSigners",
    "bundle_from_files",
    "digest",
    "load_bundle",
    "read_files",
    "sign_digest",
    "verify_activation",
]
