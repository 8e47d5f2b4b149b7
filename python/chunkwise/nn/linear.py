"""``ChunkwiseLinear``: a base ``nn.Linear`` / GPT-2 ``Conv1D`` plus rank ladders, applied per the
token plan of the current forward.

The base layer is kept as ``base_layer`` (like PEFT) and runs unchanged; the LoRA delta of each
adapter is ``((x A'[:r]ᵀ) ⊙ G[:, :r]) B'[:, :r]ᵀ`` with the plan's gate matrix G (rank prefix,
cross-fade band and rung scale in one), accumulated into the base output in place. This
pure-torch path is the CPU path, the GPU fallback and the oracle of the fused kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .. import kernels
from ..adapters.ladder import LadderModule
from ..errors import StateError
from .token_plan import TokenPlan

__all__ = ["ChunkwiseLinear", "linear_shape"]


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of an ``nn.Linear`` or GPT-2 ``Conv1D``; None otherwise."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        w = module.weight
        assert isinstance(w, torch.Tensor)
        return int(w.shape[0]), int(w.shape[1])
    return None


class ChunkwiseLinear(nn.Module):
    """A linear layer whose LoRA rank follows the current :class:`TokenPlan`.

    :meth:`add_ladder` gives it adapter i's factors for this layer, kept as the non-persistent
    buffers ``ladder_a_i`` [R, in], ``ladder_b_i`` [out, R] and ``ladder_bias_i`` (lora_B's bias
    or None), so ``.to()`` moves them with the model; an adapter without them does not adapt this
    layer. ``plan_source`` returns the plan of the forward in progress; with no plan the layer
    behaves like its base layer.
    """

    def __init__(self, base_layer: nn.Module, plan_source: Callable[[], TokenPlan | None]) -> None:
        super().__init__()
        shape = linear_shape(base_layer)
        if shape is None:
            raise TypeError(f"ChunkwiseLinear wraps nn.Linear or Conv1D, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features, self.out_features = shape
        self._plan_source = plan_source
        self._ranks: dict[int, int] = {}
        self._factors: tuple[tuple[int, ...], kernels.LoraFactors] | None = None

    def add_ladder(self, adapter: int, ladder: LadderModule) -> None:
        """Attaches adapter ``adapter``'s factors (moved to the base layer's device and dtype)."""
        w = self.base_layer.weight
        assert isinstance(w, torch.Tensor)
        self.register_buffer(
            f"ladder_a_{adapter}", ladder.a.to(device=w.device, dtype=w.dtype), persistent=False
        )
        self.register_buffer(
            f"ladder_b_{adapter}", ladder.b.to(device=w.device, dtype=w.dtype), persistent=False
        )
        bias = None if ladder.bias is None else ladder.bias.to(device=w.device, dtype=w.dtype)
        self.register_buffer(f"ladder_bias_{adapter}", bias, persistent=False)
        self._ranks[adapter] = ladder.rank

    def _lora_factors(self) -> kernels.LoraFactors:
        """The ladders as the CUDA kernels read them; rebuilt when a buffer moved (.to())."""
        pairs = [
            (getattr(self, f"ladder_a_{i}"), getattr(self, f"ladder_b_{i}")) if i in self._ranks else None
            for i in range(max(self._ranks) + 1)
        ]
        key = tuple(t.data_ptr() for p in pairs if p is not None for t in p)
        if self._factors is None or self._factors[0] != key:
            self._factors = (key, kernels.LoraFactors(pairs))
        return self._factors[1]

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        plan = self._plan_source()
        if plan is None or not self._ranks:
            return y
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] != plan.n_tokens:
            raise StateError(
                f"plan: covers {plan.n_tokens} tokens but this forward has {x2.shape[0]}; "
                "set the plan for the inputs being run",
                "plan",
            )
        y2 = y.view(-1, self.out_features)
        if (
            plan.segments is not None
            and kernels.use_cuda_kernels(x2)
            and x2.dtype == y2.dtype == self.base_layer.weight.dtype
        ):
            x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
            kernels.lora_delta_cuda(x2, y2, self._lora_factors(), **plan.segments.kwargs())
            for block in plan.blocks:  # lora_B biases (lora_bias=True) apply at every rung
                bias = getattr(self, f"ladder_bias_{block.adapter}") if block.adapter in self._ranks else None
                if bias is None:
                    continue
                if block.rows is None:
                    y2.add_(bias)
                else:
                    y2.index_add_(0, block.rows, bias.expand(len(block.rows), -1))
            return y
        for block in plan.blocks:
            full = self._ranks.get(block.adapter)
            if full is None:
                continue
            r = min(block.max_rank, full)
            xs = x2 if block.rows is None else x2.index_select(0, block.rows)
            bias = getattr(self, f"ladder_bias_{block.adapter}")
            if r > 0:
                a = getattr(self, f"ladder_a_{block.adapter}")[:r]
                b = getattr(self, f"ladder_b_{block.adapter}")[:, :r]
                h = (xs.to(a.dtype) @ a.T).mul_(block.gates[:, :r].to(a.dtype))
                if block.rows is None:
                    y2.addmm_(h.to(y2.dtype), b.T.to(y2.dtype))
                    if bias is not None:
                        y2.add_(bias)
                    continue
                out = h @ b.T
            else:
                out = torch.zeros(xs.shape[0], self.out_features, device=y.device, dtype=y.dtype)
            if bias is not None:
                out = out + bias
            if block.rows is None:
                y2.add_(out.to(y2.dtype))
            else:
                y2.index_add_(0, block.rows, out.to(y2.dtype))
        return y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={dict(sorted(self._ranks.items()))}"
