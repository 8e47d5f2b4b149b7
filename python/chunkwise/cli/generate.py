"""``chunkwise generate``: generate text with per-token ranks and a policy KV cache, streaming
the text as it is produced (coloured by rung in a terminal), then a timing/memory summary."""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import InputError
from .loading import add_model_options, load_for_command
from .render import add_color_option, paint, use_color

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    sp = sub.add_parser(
        "generate",
        help="generate text with chunkwise ranks and a KV-cache policy",
        description="Generate a continuation of PROMPT. With --adapter every token runs at the rank "
        "the scheduler picks from the model's own uncertainty; the KV cache keeps what --kv says.",
    )
    sp.add_argument("prompt", nargs="?", help="the prompt text ('-' reads standard input)")
    sp.add_argument("--prompt-file", type=Path, help="read the prompt from this file instead")
    sp.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    add_model_options(sp)
    sp.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    sp.add_argument(
        "--kv",
        default="full",
        choices=("full", "window", "sinks", "h2o", "difficulty"),
        help="KV-cache policy: keep everything, the newest --kv-budget tokens, 4 attention sinks + "
        "the newest, heavy hitters by attention (H2O), or hard chunks first (default: full)",
    )
    sp.add_argument(
        "--kv-budget", type=int, help="tokens the KV cache keeps (needed by every policy but full)"
    )
    sp.add_argument(
        "--kv-int8",
        action="store_true",
        help="hold the least-ranked kept tokens in int8 before evicting: the budget is then the bytes "
        "of --kv-budget full-precision tokens (h2o / difficulty; sinks and the recent window stay full)",
    )
    sp.add_argument(
        "--prefill-chunk", type=int, default=512, help="prompt tokens per prefill forward (default: 512)"
    )
    sp.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)"
    )
    sp.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    sp.add_argument("--seed", type=int, help="random seed for sampling")
    add_color_option(sp, "tokens")
    sp.add_argument("--json", type=Path, help="also write tokens, ranks, difficulty and timings here")


def _prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is not None:
        try:
            return args.prompt_file.read_text(encoding="utf-8")
        except OSError as e:
            raise InputError(
                f"--prompt-file: cannot read {args.prompt_file}: {e.strerror}", "prompt_file"
            ) from None
    if args.prompt is None:
        raise InputError("prompt: give a prompt, '-' for standard input, or --prompt-file", "prompt")
    return sys.stdin.read() if args.prompt == "-" else args.prompt


def run(args: argparse.Namespace) -> int:
    from ..generation import stream
    from ..kv import KvPolicy
    from ..nn.injection import ChunkwiseModel

    text = _prompt(args)
    if not text.strip():
        raise InputError("prompt: is empty", "prompt")
    policy = KvPolicy.named(args.kv, args.kv_budget)
    if args.kv_int8:
        policy = dataclasses.replace(policy, int8=True)
    model, tok, _ = load_for_command(args)
    if args.chat and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    ids = tok(text, return_tensors="pt").input_ids
    rungs = list(model.scheduler.config.rungs) if isinstance(model, ChunkwiseModel) else []
    color = use_color(args.color, sys.stdout)
    gen = stream(
        model,
        ids,
        max_new_tokens=args.max_new_tokens,
        policy=policy,
        prefill_chunk=args.prefill_chunk,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
    )
    new: list[int] = []
    ranks: list[int] = []
    difficulty: list[float] = []
    shown = ""
    for step in gen:
        new.append(int(step.tokens[0]))
        ranks.append(int(step.rank[0]))
        difficulty.append(float(step.difficulty[0]))
        decoded = tok.decode(new, skip_special_tokens=True)
        piece, shown = decoded[len(shown) :], decoded
        if color and rungs and piece:
            piece = paint(piece, max(0, bisect.bisect_right(rungs, ranks[-1]) - 1), len(rungs))
        sys.stdout.write(piece)
        sys.stdout.flush()
        if step.done[0]:
            break
    sys.stdout.write("\n\n")
    cache = gen.cache
    per_token = cache.bytes_per_token
    full_slots = ids.shape[1] + len(new) - 1
    decode_ms = 1e3 * gen.decode_seconds / max(1, len(new) - 1)
    print(
        f"prompt {ids.shape[1]} tokens, prefill {1e3 * gen.prefill_seconds:.0f} ms in chunks of "
        f"{args.prefill_chunk}; {len(new)} new tokens, {decode_ms:.1f} ms/token"
    )
    if rungs:
        mean = sum(ranks) / len(ranks)
        print(f"ranks: mean {mean:.1f} of max {rungs[-1]} while decoding; prefill chunks {gen.prefill_ranks}")
    peak_mb, full_mb = cache.peak_bytes / 2**20, full_slots * per_token / 2**20
    int8 = f", {cache.quantized} tokens moved to int8" if args.kv_int8 else ""
    print(
        f"KV cache ({args.kv}): peak {cache.peak_slots} slots = {peak_mb:.2f} MB (a full cache: "
        f"{full_slots} slots = {full_mb:.2f} MB), {cache.evictions} evictions{int8}"
    )
    if args.json is not None:
        record = {
            "prompt_tokens": int(ids.shape[1]),
            "new_tokens": new,
            "text": shown,
            "ranks": ranks,
            "difficulty": difficulty,
            "prefill_seconds": gen.prefill_seconds,
            "decode_seconds": gen.decode_seconds,
            "kv": {
                "policy": args.kv,
                "budget": cache.policy.budget,
                "peak_slots": cache.peak_slots,
                "peak_bytes": cache.peak_bytes,
                "int8": bool(args.kv_int8),
                "int8_moves": cache.quantized,
            },
        }
        args.json.write_text(json.dumps(record, indent=2))
    return 0
