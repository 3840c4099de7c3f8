"""Retention policies: which tokens to keep. One policy per file; each declares its own parameters.

:data:`POLICIES` maps spec names to policy classes; the spec registry, ``kvcache info`` and docs/spec.md read
the parameters from there, so adding a policy touches its own file and this list only.
"""

from __future__ import annotations

from kvcache.policies.base import Policy
from kvcache.policies.diffsnap import DiffSnap
from kvcache.policies.h2o import H2O
from kvcache.policies.keydiff import KeyDiff
from kvcache.policies.keyformer import Keyformer
from kvcache.policies.knorm import KNorm
from kvcache.policies.snapkv import SnapKV
from kvcache.policies.streaming import Streaming
from kvcache.policies.tova import TOVA

__all__ = ["POLICIES", "Policy"]

#: spec name -> policy class, in the order ``kvcache info`` lists them
POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (Keyformer, H2O, Streaming, SnapKV, TOVA, KNorm, KeyDiff, DiffSnap)
}
