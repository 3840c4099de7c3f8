"""Models: the bundled default model and loading by name or path."""

from kvcache.models.load import DEFAULT_MODEL_DIR, load

__all__ = ["DEFAULT_MODEL_DIR", "load"]
