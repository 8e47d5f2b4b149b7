"""Extractive QA in SQuAD form as token ids: what the QA adapter is trained on and evaluated with.

One example is a prompt (the context, the question and the instruction, in the model's chat
template, see :func:`chunkwise.eval.evaluation.squad_prompt`) followed by the answer: the first
gold answer span, then the token that ends the model's turn. Training and evaluation both build
their sequences here, so the two never drift apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import InputError
from .evaluation import squad_prompt

__all__ = ["QaIds", "end_of_turn_id", "qa_ids"]


@dataclasses.dataclass(frozen=True)
class QaIds:
    """The token ids of one QA example: ``prompt`` then ``answer`` (answer span + end of turn)."""

    prompt: tuple[int, ...]
    answer: tuple[int, ...]

    @property
    def ids(self) -> list[int]:
        """Prompt and answer, as one sequence."""
        return [*self.prompt, *self.answer]

    def __len__(self) -> int:
        return len(self.prompt) + len(self.answer)


def end_of_turn_id(tokenizer: Any) -> int:
    """The id that ends an answer: the chat template's end-of-turn token (``<|im_end|>`` for
    SmolLM2) when there is one, else the tokenizer's EOS."""
    eos = tokenizer.eos_token_id
    if isinstance(eos, int) and eos >= 0:
        return eos
    raise InputError("tokenizer: has no eos_token_id to end an answer with", "tokenizer")


def qa_ids(tokenizer: Any, example: Mapping[str, Any], answer: str | None = None) -> QaIds:
    """The prompt and answer ids of a SQuAD example (``context``, ``question``, ``answers``).

    ``answer`` replaces the gold answer (default: ``example["answers"][0]``, stripped). The answer
    is tokenized after a space-free join with the prompt (the chat template ends the prompt with
    a newline), so its ids are exactly what the model would generate.
    """
    for key in ("context", "question"):
        if not isinstance(example.get(key), str):
            raise InputError(f"example: needs a string {key!r}", "example")
    if answer is None:
        answers: Sequence[str] = example.get("answers") or ()
        if not answers or not isinstance(answers[0], str) or not answers[0].strip():
            raise InputError(f"example {example.get('id')!r}: has no answer text", "example")
        answer = answers[0]
    prompt = tokenizer(
        squad_prompt(tokenizer, example["context"], example["question"]), add_special_tokens=False
    ).input_ids
    ans = tokenizer(answer.strip(), add_special_tokens=False).input_ids
    return QaIds(tuple(int(i) for i in prompt), (*(int(i) for i in ans), end_of_turn_id(tokenizer)))
