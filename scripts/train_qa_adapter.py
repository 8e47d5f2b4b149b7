#!/usr/bin/env python3
"""Train the extractive-QA LoRA of issue 11 for SmolLM2-135M-Instruct, on CPU, from a seed.

Data (bigbench ``squad_shifts`` only, nothing else): the SQuAD v1.1 dev questions of the TRAIN
articles of ``split_by_article(squaddev, "title", eval_fraction, split_seed)``, plus (default)
every question of the ``new_wiki`` shift (other articles altogether). The held-out squaddev
articles are never trained on; the summary lists them.

Each example is ``qa_ids`` (chunkwise.eval.qa): the chat-template prompt with the context and
question, then the first gold answer and ``<|im_end|>``; the loss is the answer tokens' mean
NLL. Batches group examples of similar length (less padding); everything random is seeded.
Forward and backward run under bfloat16 autocast by default (AMX / AVX-512 BF16 make it about
3x faster than float32 on CPU; the LoRA weights and the optimizer stay float32).

Before and after training, the teacher-forced answer NLL of ``--eval-questions`` held-out
questions is measured (the same questions both times). The output directory receives the PEFT
adapter (``save_pretrained``) and ``training_summary.json``; a directory that already holds an
adapter trained with the same arguments is reused (``--force`` retrains).

Example (about 55 minutes on 2 cores: ~6 s per step of 8 examples)::

    python scripts/train_qa_adapter.py --out adapters/smollm2-qa-r64
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from train_adapter import HelpFormatter, available_cores, environment, log, seed_everything

#: arguments that do not change the trained adapter (a cached adapter is reused across them)
_RUN_ONLY = ("out", "force", "threads", "log_every", "no_progress", "cache_dir")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="train_qa_adapter.py",
        description=(
            "Train an extractive-QA LoRA for SmolLM2-135M-Instruct on SQuAD (squaddev TRAIN articles "
            "and the new_wiki shift of bigbench squad_shifts); answer NLL on held-out squaddev "
            "articles before and after. Writes the adapter and training_summary.json to --out."
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument("--out", required=True, type=Path, help="output directory for the adapter and summary")
    p.add_argument("--force", action="store_true", help="retrain even if --out holds this adapter")
    g = p.add_argument_group("data")
    g.add_argument("--eval-fraction", type=float, default=0.2, help="share of squaddev articles held out")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the article-level split")
    g.add_argument(
        "--no-new-wiki", action="store_true", help="train on the squaddev TRAIN articles only (no new_wiki)"
    )
    g.add_argument(
        "--max-tokens", type=int, default=512, help="drop training examples longer than this (prompt+answer)"
    )
    g.add_argument("--eval-questions", type=int, default=300, help="held-out questions for the answer NLL")
    g.add_argument(
        "--cache-dir", type=Path, default=None, help="chunkwise cache (default ~/.cache/chunkwise)"
    )
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", "-r", type=int, default=64, help="LoRA rank r")
    g.add_argument("--alpha", type=float, default=128.0, help="lora_alpha (scale = alpha / r)")
    g.add_argument("--dropout", type=float, default=0.05, help="lora_dropout")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=520, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=8, help="examples per step")
    g.add_argument("--lr", type=float, default=3e-4, help="peak AdamW learning rate")
    g.add_argument("--warmup-steps", type=int, default=20, help="linear warm-up, then cosine to 10 %%")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (0 = off)")
    g.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="autocast dtype of the step")
    g.add_argument("--seed", type=int, default=0, help="seed of the LoRA init, dropout and batch order")
    g = p.add_argument_group("run")
    g.add_argument("--threads", type=int, default=available_cores(), help="torch intra-op threads")
    g.add_argument("--log-every", type=int, default=25, help="log the mean loss every N steps")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "rank", "threads", "log_every", "eval_questions", "max_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0.0 < args.eval_fraction < 1.0:
        p.error("--eval-fraction must be in (0, 1)")
    if args.lr <= 0 or not math.isfinite(args.lr):
        p.error(f"--lr must be a positive number, got {args.lr}")
    return args


def training_args(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments that determine the adapter (what a cached one must match)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in _RUN_ONLY}


def cached(out: Path, args: argparse.Namespace) -> bool:
    """Whether ``out`` holds an adapter trained with these arguments."""
    summary = out / "training_summary.json"
    if not (summary.is_file() and (out / "adapter_model.safetensors").is_file()):
        return False
    try:
        return json.loads(summary.read_text()).get("args") == training_args(args)
    except (OSError, ValueError):
        return False


def held_out_split(
    cache_dir: Path | None, eval_fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held-out) squaddev questions, split by article."""
    from chunkwise.assets.corpora import split_by_article, squad_examples

    return split_by_article(squad_examples(cache_dir), "title", eval_fraction=eval_fraction, seed=seed)


def batches(lengths: np.ndarray, batch_size: int, gen: np.random.Generator) -> list[np.ndarray]:
    """One epoch of index batches: shuffled, then sorted by length inside windows of 32 batches
    (similar lengths share a batch: less padding), then the batches shuffled."""
    order = gen.permutation(len(lengths))
    window = 32 * batch_size
    out: list[np.ndarray] = []
    for s in range(0, len(order), window):
        w = order[s : s + window]
        w = w[np.argsort(lengths[w], kind="stable")]
        out += [w[i : i + batch_size] for i in range(0, len(w), batch_size)]
    return [out[i] for i in gen.permutation(len(out))]


#: batches are padded to a multiple of this many tokens: few distinct shapes, so oneDNN's
#: bfloat16 kernels are built a few times, not once per batch
PAD_MULTIPLE = 32


def collate(examples: list[Any], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) right-padded to a multiple of :data:`PAD_MULTIPLE`;
    labels are -100 outside the answers."""
    t = -(-max(len(e) for e in examples) // PAD_MULTIPLE) * PAD_MULTIPLE
    ids = torch.full((len(examples), t), pad, dtype=torch.long)
    mask = torch.zeros((len(examples), t), dtype=torch.long)
    labels = torch.full((len(examples), t), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n, p = len(e), len(e.prompt)
        ids[i, :n] = torch.tensor(e.ids)
        mask[i, :n] = 1
        labels[i, p:n] = torch.tensor(e.answer)
    return ids, mask, labels


@torch.no_grad()
def answer_nll(
    model: torch.nn.Module, examples: list[Any], pad: int, autocast: bool, progress: bool
) -> float:
    """Mean NLL per answer token, teacher-forced (float32 log-softmax)."""
    from tqdm.auto import tqdm

    was = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    for s in tqdm(range(0, len(order), 8), desc="answer nll", disable=not progress, leave=False):
        ids, mask, labels = collate([examples[i] for i in order[s : s + 8]], pad)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids, attention_mask=mask).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        tgt = labels[:, 1:]
        keep = tgt != -100
        total -= float(logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0][keep].sum())
        count += int(keep.sum())
    model.train(was)
    return total / max(count, 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.force and cached(args.out, args):
        log(f"{args.out} already holds an adapter trained with these arguments (--force retrains)")
        return 0
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)

    from chunkwise.assets.corpora import squad_examples
    from chunkwise.assets.smollm2 import SMOLLM2_GGUF, SMOLLM2_REQUIREMENT, load_smollm2
    from chunkwise.eval.qa import qa_ids
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    train_q, held_q = held_out_split(args.cache_dir, args.eval_fraction, args.split_seed)
    sources = {"squaddev_train": len(train_q)}
    if not args.no_new_wiki:
        wiki = squad_examples(args.cache_dir, shift="new_wiki")
        sources["new_wiki"] = len(wiki)
        train_q = train_q + wiki
    model, tokenizer = load_smollm2(torch.float32, cache_dir=args.cache_dir, progress=not args.no_progress)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train = [qa_ids(tokenizer, ex) for ex in train_q]
    n_all = len(train)
    train = [e for e in train if len(e) <= args.max_tokens]
    pick = np.random.default_rng(args.seed).permutation(len(held_q))[: args.eval_questions]
    evals = [qa_ids(tokenizer, held_q[i]) for i in sorted(pick)]
    log(
        f"data: {len(train)} training examples ({n_all - len(train)} over {args.max_tokens} tokens dropped; "
        f"{sources}), {len(held_q)} held-out questions in {len({q['title'] for q in held_q})} articles"
    )

    lora = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules="all-linear",
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    autocast = args.precision == "bf16"
    t0 = time.perf_counter()
    nll_before = answer_nll(model, evals, pad, autocast, not args.no_progress)
    log(f"held-out answer NLL before: {nll_before:.4f} ({time.perf_counter() - t0:.0f} s)")

    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        done = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))

    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_at)
    gen = np.random.default_rng(args.seed)
    lengths = np.array([len(e) for e in train])
    queue: list[np.ndarray] = []
    epoch = 0
    history: list[dict[str, float]] = []
    window: list[float] = []
    model.train()
    t_train = time.perf_counter()
    bar = tqdm(range(args.steps), desc="train", disable=args.no_progress, dynamic_ncols=True)
    for step in bar:
        if not queue:
            queue, epoch = batches(lengths, args.batch_size, gen), epoch + 1
        ids, mask, labels = collate([train[i] for i in queue.pop()], pad)
        optim.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optim.step()
        sched.step()
        window.append(float(loss.detach()))
        bar.set_postfix(loss=f"{window[-1]:.3f}")
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            entry = {
                "step": step + 1,
                "loss": sum(window) / len(window),
                "lr": optim.param_groups[0]["lr"],
                "seconds": time.perf_counter() - t_train,
                "epoch": epoch,
            }
            history.append(entry)
            window = []
            log(f"step {step + 1}/{args.steps} loss {entry['loss']:.4f} lr {entry['lr']:.2e}")
    bar.close()
    train_seconds = time.perf_counter() - t_train
    nll_after = answer_nll(model, evals, pad, autocast, not args.no_progress)
    log(f"held-out answer NLL after: {nll_after:.4f} (before {nll_before:.4f})")

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    summary = {
        "args": training_args(args),
        "base_model": {"requirement": SMOLLM2_REQUIREMENT, "gguf": SMOLLM2_GGUF, "dtype": "float32"},
        "data": {
            "source": "bigbench==1.0.0 squad_shifts: squaddev_v1.1.json (train articles)"
            + ("" if args.no_new_wiki else " + new_wiki_v1.0.json"),
            "examples": sources,
            "trained_on": len(train),
            "held_out_titles": sorted({q["title"] for q in held_q}),
            "held_out_questions": len(held_q),
            "epochs_started": epoch,
        },
        "answer_nll_before": nll_before,
        "answer_nll_after": nll_after,
        "eval_questions": len(evals),
        "losses": history,
        "time_seconds": {"train": train_seconds, "total": time.perf_counter() - t_start},
        "environment": environment(),
    }
    (args.out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(
        f"saved the adapter and training_summary.json to {args.out} "
        f"({summary['time_seconds']['total']:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
