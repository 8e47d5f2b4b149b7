"""Policy-driven KV caching: policies, the ``transformers`` cache that applies them, and the
attention hook that feeds heavy-hitter scores (docs/architecture.md §6)."""

from .attention import track_attention
from .cache import PolicyCache, left_padding
from .policy import POLICY_KINDS, KvPolicy

__all__ = ["POLICY_KINDS", "KvPolicy", "PolicyCache", "left_padding", "track_attention"]
