"""``benches.prefill_cpu.held_out_ids``: without the bigbench corpus a figure of record must fail
loudly (the bundled sample repeated has a perplexity of ~1.2), and only timing-only callers may
fall back to the sample text."""

from __future__ import annotations

import pytest
import torch
from chunkwise.assets import corpora
from chunkwise.errors import ChunkwiseError

from benches.prefill_cpu import held_out_ids


class _CharTokenizer:
    """One id per character: enough to see which text reached the tokenizer."""

    def __call__(self, text: str, return_tensors: str = "pt"):
        assert return_tensors == "pt"

        class _Out:
            input_ids = torch.tensor([[ord(c) % 256 for c in text]])

        return _Out()


def _no_corpus(*args, **kwargs):
    raise ChunkwiseError("bigbench-1.0.0.tar.gz is not in /nowhere and download=False")


def test_missing_corpus_raises_naming_the_cause(monkeypatch):
    monkeypatch.setattr(corpora, "wikipedia_articles", _no_corpus)
    with pytest.raises(ChunkwiseError, match=r"held-out Wikipedia text is unavailable.*bigbench-1\.0\.0"):
        held_out_ids(_CharTokenizer(), 100)


def test_timing_callers_may_fall_back_to_the_sample(monkeypatch, capsys):
    from chunkwise.assets import sample_text

    monkeypatch.setattr(corpora, "wikipedia_articles", _no_corpus)
    ids = held_out_ids(_CharTokenizer(), 100, allow_sample=True)
    assert ids.tolist() == [ord(c) % 256 for c in (sample_text() * 50)[:100]]
    assert "timing on the bundled sample text" in capsys.readouterr().out


def test_corpus_text_is_used_when_present(monkeypatch):
    arts = [corpora.Article(f"t{i}", "en", (f"paragraph {i} " * 5,)) for i in range(20)]
    monkeypatch.setattr(corpora, "wikipedia_articles", lambda *a, **k: arts)
    _, ev = corpora.split_by_article(arts, "title", eval_fraction=0.2, seed=0)
    ids = held_out_ids(_CharTokenizer(), 50)
    assert ids.tolist() == [ord(c) % 256 for c in "\n\n".join(a.text for a in ev)[:50]]
