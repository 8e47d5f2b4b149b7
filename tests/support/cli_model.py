"""A tiny local model folder for the command-line tests: random Llama weights, a word-level
tokenizer built here (no hub), and a PEFT adapter in ``adapter/``.

A plain module (not a conftest): ``tests/conftest.py`` builds it once per session as the ``model_dir``
fixture.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tests.support.peft_helpers import VOCAB, make_adapter, tiny_model

WORDS = [f"w{i}" for i in range(VOCAB - 3)]
#: 300 words of the tiny model's vocabulary (the text of the eval and plan tests).
TEXT = " ".join(WORDS[(i * 7) % 50] for i in range(300))


def build_model_dir(folder: Path) -> Path:
    """Writes the tiny model, its tokenizer and ``adapter/`` into ``folder``."""
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="</s>"
    )
    model = tiny_model("llama", max_position_embeddings=512)
    model.generation_config.eos_token_id = None
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    make_adapter(model, folder / "adapter", seed=5, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    return folder
