"""What a prefill plan's blocks cost in the CPU torch path: the LoRA delta of SmolLM2-135M's 210
adapted modules (random r=64 factors, their real shapes) for 256 rows laid out in blocks.

    python -m benches.lora_blocks [--rounds 15] [--grouped]

Each layout is a :class:`~chunkwise.nn.TokenPlan` of per-token ranks cut into blocks by
``rank_runs`` at a given block cost (``BLOCK_COST``, as in generation, or 0: a block per run);
its time is a ``ChunkwiseLinear`` forward
under the plan over all modules with the base layers stubbed out (only the LoRA path is
timed), medians of interleaved rounds. Why issue 15's S1 prefill misses with the scheduler:
each block is its own pair of BLAS calls (factors packed again, small row counts), so at equal
rank-tokens two blocks cost ~1.4x one and four ~1.7x, and the scheduler's plan (a rank-64 head,
rank-8/4 stretches, 3 blocks) costs more than one rank-32 block however its runs are merged.

``--grouped`` times issue 15's S2 instead: eight adapters, one per row, in a prefill of 8 x 64
rows (the scheduler's ranks of that run) and in decode steps of 8 rows, each plan as its grouped
pass (one ``bmm`` pair over the stacked factors, bands above its common rank) and as plain
blocks (a matmul pair per adapter and run), interleaved; decode steps as ``DecodePlan`` lays
them out, also one where a single row runs at rank 64.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np
import torch
from chunkwise.adapters.ladder import LadderModule
from chunkwise.kernels import TokenArrays
from chunkwise.nn import ChunkwiseLinear, DecodePlan, TokenPlan
from chunkwise.nn.token_plan import BLOCK_COST

ROWS = 256
#: (in, out) of each adapted linear of one SmolLM2-135M layer; 30 layers.
SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]


def _ranks(runs: list[tuple[int, int]]) -> np.ndarray:
    return np.concatenate([np.full(n, r, np.int32) for r, n in runs])


S1 = [(64, 48), (8, 24), (32, 144), (4, 40)]  # the scheduler's plan of issue 15's S1 prompt

#: name -> (per-token ranks as (rank, tokens) runs, the block cost ``rank_runs`` cuts them at).
LAYOUTS: dict[str, tuple[np.ndarray, int]] = {
    "rank 32, 1 block": (_ranks([(32, 256)]), BLOCK_COST),
    "rank 16, 1 block": (_ranks([(16, 256)]), BLOCK_COST),
    "rank 64, 1 block": (_ranks([(64, 256)]), BLOCK_COST),
    # mean rank 32 in blocks of ranks 24 / 40 (multiples of 8, like every rung: odd ranks hit
    # slower BLAS paths and would confound the per-block cost)
    "mean rank 32, 2 blocks of 128": (_ranks([(24, 128), (40, 128)]), 0),
    "mean rank 32, 4 blocks of 64": (_ranks([(24, 64), (40, 64), (24, 64), (40, 64)]), 0),
    "S1 plan, a block per run": (_ranks(S1), 0),
    # what runs under 32 tokens joining a neighbour made of it (before the cost search)
    "S1 plan, short runs merged": (_ranks([(64, 72), (32, 144), (4, 40)]), 0),
    "S1 plan, cheapest (BLOCK_COST)": (_ranks(S1), BLOCK_COST),
    "S1 plan, 1 block": (_ranks(S1), 10**9),
}


class _NoBase(torch.nn.Linear):
    """A linear layer of the right shape whose forward returns one preallocated output: what
    is timed is then the LoRA path alone (a base matmul is ~8x larger and as noisy)."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__(i, o, bias=False)
        self.out = torch.zeros(ROWS, o)  # (the output of any forward of ROWS rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out


def _plan(ranks: np.ndarray, block_cost: int) -> TokenPlan:
    ones = np.ones(ROWS, np.float32)
    tokens = TokenArrays(ranks, ranks, ones, ones, ones, np.zeros(ROWS, np.int32), np.arange(ROWS), ROWS)
    return TokenPlan.build(tokens, block_cost=block_cost)


#: The scheduler's prefill ranks of issue 15's S2 (8 prompts of 64 tokens, random r=64
#: adapters, target mean rank 32), as (rank, tokens) runs per row; and its decode ranks (one step).
S2_PREFILL = [
    [(32, 52), (4, 12)],
    [(32, 52), (4, 12)],
    [(32, 44), (8, 20)],
    [(64, 36), (4, 12), (32, 16)],
    [(64, 28), (4, 12), (32, 24)],
    [(64, 20), (4, 12), (32, 32)],
    [(32, 20), (8, 12), (32, 32)],
    [(8, 24), (32, 40)],
]
S2_DECODE = [4, 8, 4, 8, 16, 8, 8, 8]
#: A decode step where one row's token is hard (rank 64) and the others easy.
S2_DECODE_SPIKE = [4, 4, 4, 4, 4, 4, 4, 64]


@dataclasses.dataclass
class _Step:
    """One decode step's decisions (what ``DecodePlan.update`` reads)."""

    rank: np.ndarray
    lo: np.ndarray
    gate_lo: np.ndarray
    gate_hi: np.ndarray
    scale: np.ndarray


def grouped(rounds: int) -> int:
    """S2's LoRA path with eight adapters: grouped pass against plain blocks."""
    g = torch.Generator().manual_seed(0)
    current: list[TokenPlan | None] = [None]
    rows = {"prefill": 8 * 64, "decode": 8}
    layers = []
    for i, o in SHAPES * 30:
        layer = ChunkwiseLinear(_NoBase(i, o), lambda: current[0])
        for a in range(8):
            lad = LadderModule(torch.randn(64, i, generator=g) * 0.02, torch.randn(o, 64, generator=g) * 0.02)
            layer.add_ladder(a, lad, stack=False)
        layer.stack_ladders()
        layers.append(layer)
    inputs = {(k, i): torch.randn(n, i, generator=g) for k, n in rows.items() for i in (576, 1536)}
    outs = {(k, o): torch.zeros(n, o) for k, n in rows.items() for o in (192, 576, 1536)}
    plans: dict[str, tuple[str, TokenPlan]] = {}
    n = rows["prefill"]
    ones = np.ones(n, np.float32)
    r = np.concatenate([_ranks(runs) for runs in S2_PREFILL])
    tokens = TokenArrays(r, r, ones, ones, ones, np.repeat(np.arange(8, dtype=np.int32), 64), np.arange(n), n)
    plans["prefill, grouped"] = ("prefill", TokenPlan.build(tokens))
    plans["prefill, blocks"] = ("prefill", TokenPlan.build(tokens))
    plans["prefill, blocks"][1].grouped = None
    # decode steps as generation lays them out: a DecodePlan per step (its grouped pass, or not)
    for name, step in (("decode", S2_DECODE), ("decode spike", S2_DECODE_SPIKE)):
        for how in ("grouped", "blocks"):
            dplan = DecodePlan(np.arange(8), 64, "cpu", torch.float32)
            if how == "blocks":
                dplan.plan.grouped = None
            r8 = np.asarray(step, np.int32)
            ones8 = np.ones(8, np.float32)
            plans[f"{name}, {how}"] = ("decode", dplan.update(_Step(r8, r8, ones8, ones8, ones8)))
    assert all(p.grouped is not None for name, (_, p) in plans.items() if name.endswith("grouped"))

    def run(kind: str, plan: TokenPlan) -> float:
        current[0] = plan
        for layer in layers:  # the stubbed base returns this forward's own output buffer
            layer.base_layer.out = outs[kind, layer.out_features]
        t0 = time.perf_counter()
        for layer in layers:
            layer(inputs[kind, layer.in_features])
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {name: [] for name in plans}
    for _ in range(2):
        for kind, plan in plans.values():
            run(kind, plan)
    for _ in range(rounds):
        for name, (kind, plan) in plans.items():
            times[name].append(run(kind, plan))
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"LoRA path of {len(layers)} modules, 8 adapters, medians of {rounds} interleaved rounds")
    print(f"{'plan':20s} {'passes':>6s} {'LoRA ms':>8s} {'x blocks':>8s}")
    for name, (_, plan) in plans.items():
        gp = plan.grouped
        passes = len(plan.blocks) if gp is None else 1 + len(gp.extra)
        ratio = med[name] / med[name.rsplit(",", 1)[0] + ", blocks"]
        print(f"{name:20s} {passes:6d} {med[name] * 1e3:8.2f} {ratio:8.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default: 15)")
    p.add_argument("--grouped", action="store_true", help="time S2's eight adapters instead (see above)")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    if args.grouped:
        return grouped(args.rounds)
    g = torch.Generator().manual_seed(0)
    current: list[TokenPlan | None] = [None]
    layers = []
    for i, o in SHAPES * 30:
        layer = ChunkwiseLinear(_NoBase(i, o), lambda: current[0])
        layer.add_ladder(
            0, LadderModule(torch.randn(64, i, generator=g) * 0.02, torch.randn(o, 64, generator=g) * 0.02)
        )
        layers.append(layer)
    inputs = {i: torch.randn(ROWS, i, generator=g) for i in (576, 1536)}
    plans = {name: _plan(r, cost) for name, (r, cost) in LAYOUTS.items()}

    def run(plan: TokenPlan | None) -> float:
        current[0] = plan
        t0 = time.perf_counter()
        for layer in layers:
            layer(inputs[layer.in_features])
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {name: [] for name in plans}
    for _ in range(2):  # warm-up
        for plan in plans.values():
            run(plan)
    for _ in range(args.rounds):
        for name, plan in plans.items():
            times[name].append(run(plan))
    lora = {name: statistics.median(times[name]) for name in plans}
    ref = lora["rank 32, 1 block"]
    print(f"LoRA path of {len(layers)} modules, {ROWS} rows, medians of {args.rounds} interleaved rounds")
    print(f"{'layout':32s} {'blocks':>6s} {'rank-tokens':>11s} {'LoRA ms':>8s} {'x rank 32':>9s}")
    for name, plan in plans.items():
        work = sum((b.span[1] - b.span[0] if b.span else ROWS) * b.max_rank for b in plan.blocks)
        print(f"{name:32s} {len(plan.blocks):6d} {work:11d} {lora[name] * 1e3:8.1f} {lora[name] / ref:9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
