"""Code versions of the assets, and data versions built from digests.

Dagster marks an asset stale when its code version differs from the one its latest materialization ran with, or
when an upstream asset's data version changed since. Bump an asset's code version when a change to its code (or the
core code it calls) changes what it writes; data versions are digests of what was written.
"""

import hashlib

CODE_VERSIONS = {
    "raw_preferences": "1",
    "cleaned_preferences": "1",
    "tokenized_dataset": "1",
    "base_model": "1",
    "orpo_adapter": "1",
    "merged_model": "1",
    "benchmark_scores": "1",
}


def combined_version(*parts: str) -> str:
    """One data version from several digests (or any strings), order-sensitive."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\x00")
    return h.hexdigest()[:32]
