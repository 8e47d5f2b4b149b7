"""``ChunkwiseLinear``: a base ``nn.Linear`` / GPT-2 ``Conv1D`` plus rank ladders, applied per the
token plan of the current forward.

The base layer is kept as ``base_layer`` (like PEFT) and runs unchanged; the LoRA delta of each
adapter is ``((x A'[:r]ᵀ) ⊙ G[:, :r]) B'[:, :r]ᵀ`` with the plan's gate matrix G (rank prefix,
cross-fade band and rung scale in one), accumulated into the base output in place. This
pure-torch path is the CPU path, the GPU fallback and the oracle of the fused kernels.

Decode steps on the CPU take a shorter road (:class:`_Fold`): the first adapter's A' sits under
the base weight in one matrix whose top rows *are* the base layer's weight, so one GEMM gives the
base output and the rank-r shrink together, and the layer does not dispatch through its base
module. What that costs: hooks registered on ``base_layer`` do not run in those steps (register
them on the ``ChunkwiseLinear``, or set ``fold=False``), and adapter 0's A' is held twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..adapters.ladder import LadderModule, prefix_layout
from ..errors import StateError
from .token_plan import AdapterBlock, GroupedPass, TokenPlan

__all__ = ["FOLD_MAX_ROWS", "STACK_MAX_PADDING", "ChunkwiseLinear", "linear_shape"]

#: The most rows a forward may have to run folded (decode steps of small batches). Above it, as
#: in prefill, the separate shrink was as fast or faster: SmolLM2-135M, 256-token prompt, rank
#: 32, 1.08x merged separate against 1.11x folded (2 cores, 2026-12-06).
FOLD_MAX_ROWS = 16

#: The most zero padding :meth:`ChunkwiseLinear.stack_ladders` accepts, as a share of the
#: adapters' own rank rows: a stack holds every adapter at the largest rank, so adapters of
#: ranks 64 and 7 x 8 would take 4.3x their memory; above this share they stay apart.
STACK_MAX_PADDING = 0.25


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of an ``nn.Linear`` or GPT-2 ``Conv1D``; None otherwise."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        w = module.weight
        assert isinstance(w, torch.Tensor)
        return int(w.shape[0]), int(w.shape[1])
    return None


class _Factors:
    """One adapter's factors of one layer as plain attributes, with their rank-band views
    cached: the hot path makes no ``nn.Module`` attribute lookup and no slice."""

    __slots__ = ("a", "b", "bias", "rank", "views")

    def __init__(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, rank: int) -> None:
        self.a, self.b, self.bias, self.rank = a, b, bias, rank
        self.views: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def band(self, col: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A'[col:r]ᵀ, B'[:, col:r]ᵀ)``: what the shrink and the expand of singular directions
        ``col <= j < r`` multiply by (``col`` 0: the rank-r prefix)."""
        v = self.views.get((col, r))
        if v is None:
            v = self.views[col, r] = (self.a[col:r].T, self.b[:, col:r].T)
        return v


class _Stack:
    """The factors of adapters 0..n-1 of one CPU layer in one tensor per side, zero-padded to
    the largest rank: ``a`` [n, R, in], ``bt`` [n, R, out] (B' transposed, rank rows
    contiguous as ``prefix_layout`` keeps them). Each adapter's :class:`_Factors` are views of
    it, so the grouped pass reads every adapter's rank prefix with one ``bmm``."""

    __slots__ = ("a", "bt", "gathered", "n", "rank", "views")

    def __init__(self, a: torch.Tensor, bt: torch.Tensor) -> None:
        self.a, self.bt, self.n, self.rank = a, bt, int(a.shape[0]), int(a.shape[1])
        #: (first, n, rank) -> the entries' views, made once
        self.views: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        #: the last gathered entries: (ids tensor, rank) and their copies (decode steps reuse them)
        self.gathered: tuple[torch.Tensor, int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def weights(self, g: GroupedPass) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A' [n, r, in], B'ᵀ [n, r, out]) of the pass's entries, r the pass's rank clamped to
        the stack's, or None when one of them is an adapter this layer does not have."""
        c = min(g.rank, self.rank)
        if g.first is not None:
            key = (g.first, g.n, c)
            v = self.views.get(key)
            if v is None:
                if g.first + g.n > self.n:
                    return None
                v = self.views[key] = (
                    self.a[g.first : g.first + g.n, :c],
                    self.bt[g.first : g.first + g.n, :c],
                )
            return v
        if max(g.adapters) >= self.n:
            return None
        assert g.ids is not None
        last = self.gathered
        if last is None or last[0] is not g.ids or last[1] != c:
            w = (self.a[:, :c].index_select(0, g.ids), self.bt[:, :c].index_select(0, g.ids))
            last = self.gathered = (g.ids, c, w)
        return last[2]


class _Fold:
    """``[W; A'_0]``: the base weight [out, in] with adapter ``adapter``'s A' [R, in] under it
    (and the base bias with R zeros under it), one matrix whose first ``out`` rows the base
    layer's weight and bias view. ``F.linear(x, w[: out + r])`` is then the base output and
    the rank-r shrink in one GEMM that reads rank r's prefix only.

    Built only for a plain ``nn.Linear`` (exact type, ``forward`` not replaced) on the CPU;
    :meth:`current` tells whether the base layer still views it (a ``load_state_dict(assign=
    True)``, ``.data =`` or a move breaks the view: the layer folds again)."""

    __slots__ = (
        "adapter", "b_t", "base", "bias", "bias_ptr", "dtype",
        "lad_bias", "out", "rank", "views", "w", "w_ptr",
    )  # fmt: skip

    def __init__(self, base: nn.Linear, adapter: int, lad: _Factors) -> None:
        self.base, self.adapter, self.rank, self.out = base, adapter, lad.rank, base.out_features
        self.b_t = lad.b.T  # [R, out], contiguous (prefix_layout)
        self.lad_bias = lad.bias
        with torch.no_grad():
            self.w = torch.cat([base.weight.detach(), lad.a])
            base.weight.data = self.w[: self.out]
            self.bias = None
            if base.bias is not None:
                self.bias = torch.cat([base.bias.detach(), base.bias.new_zeros(lad.rank)])
                base.bias.data = self.bias[: self.out]
        self.dtype, self.w_ptr = self.w.dtype, self.w.data_ptr()
        self.bias_ptr = None if self.bias is None else self.bias.data_ptr()
        #: rank -> (weight rows, bias rows, B' rows) of that rank: views made once, not per step
        self.views: dict[int, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = {}

    @staticmethod
    def applies(base: nn.Module) -> bool:
        """Whether ``base`` is one the fold may compute itself (see the class docstring)."""
        return type(base) is nn.Linear and "forward" not in vars(base) and base.weight.device.type == "cpu"

    def current(self) -> bool:
        """Whether the base layer's weight and bias still view this fold (the storage decides: a
        new dtype, device or tensor is new storage)."""
        w, b = self.base.weight, self.base.bias
        assert isinstance(w, torch.Tensor)
        if w.data_ptr() != self.w_ptr or w.shape[0] != self.out:
            return False
        return b.data_ptr() == self.bias_ptr if isinstance(b, torch.Tensor) else self.bias_ptr is None

    def release(self) -> None:
        """Gives the base layer standalone weight and bias again (what it had before the fold)."""
        base = self.base
        if self.current():
            with torch.no_grad():
                base.weight.data = self.w[: self.out].clone()
                if self.bias is not None and isinstance(base.bias, torch.Tensor):
                    base.bias.data = self.bias[: self.out].clone()

    def _views(self, r: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(weight rows, bias rows, B' rows) of rank ``r``, made once and kept in ``views``."""
        end = self.out + r
        v = self.views[r] = (self.w[:end], None if self.bias is None else self.bias[:end], self.b_t[:r])
        return v

    def run(self, x: torch.Tensor, block: AdapterBlock) -> torch.Tensor:
        """The layer's output for ``x`` [..., in] (any leading shape), every row of it in
        ``block`` (adapter ``adapter``): a fresh contiguous tensor, as the base layer's would be."""
        r = min(block.max_rank, self.rank)
        v = self.views.get(r)
        if v is None:
            v = self._views(r)
        ye = F.linear(x, v[0], v[1])
        if r == 0:
            y = ye
        else:
            base, h = ye.split((self.out, r), -1)
            if block.gates is not None:
                h = h * (block.gates if block.gates.shape[1] == r else block.gates[:, :r]).reshape(h.shape)
            y = torch.matmul(h, v[2])
            if block.scale == 1.0:
                y.add_(base)
            else:
                y = torch.add(base, y, alpha=block.scale)
        if self.lad_bias is not None:
            y.add_(self.lad_bias)
        return y


class ChunkwiseLinear(nn.Module):
    """A linear layer whose LoRA rank follows the current :class:`TokenPlan`.

    :meth:`add_ladder` gives it adapter i's factors for this layer, kept as the non-persistent
    buffers ``ladder_a_i`` [R, in], ``ladder_b_i`` [out, R] (laid out per device, see
    ``prefix_layout``) and ``ladder_bias_i`` (lora_B's bias or None), so ``.to()`` moves them
    with the model; an adapter without them does not adapt this layer. ``plan_source`` returns
    the plan of the forward in progress; with no plan the layer behaves like its base layer.

    Per adapter block of the plan the torch path costs two matmuls (``addmm`` into the base
    output) when the block needs no gates, one multiply more when it does, and a gather and a
    scatter only when the block's rows are not consecutive. A forward of at most
    :data:`FOLD_MAX_ROWS` rows, all of the first adapter, runs folded (module docstring) when
    ``fold`` is true, the base is a plain ``nn.Linear`` on the CPU and no gradient is recorded.
    With ``stack`` (the default) several adapters on the CPU are stacked (:meth:`stack_ladders`)
    and a plan's :class:`~chunkwise.nn.token_plan.GroupedPass` runs them in one ``bmm`` pair.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        plan_source: Callable[[], TokenPlan | None],
        fold: bool = True,
        stack: bool = True,
    ) -> None:
        super().__init__()
        shape = linear_shape(base_layer)
        if shape is None:
            raise TypeError(f"ChunkwiseLinear wraps nn.Linear or Conv1D, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features, self.out_features = shape
        self._plan_source = plan_source
        self._lad: dict[int, _Factors] = {}
        self._sources: dict[int, LadderModule] = {}  # what add_ladder got: its tensors may be re-homed
        self._stack: _Stack | None = None
        self._stack_enabled = stack
        self._any_bias = False
        self._dtype: torch.dtype | None = None  # of every factor: the base weight's
        self._factors: tuple[tuple[int, ...], kernels.LoraFactors] | None = None
        self._fold_enabled = fold
        self._fold: _Fold | None = None

    @property
    def fold(self) -> bool:
        """Whether decode steps may run folded (module docstring); setting it folds or releases
        at once."""
        return self._fold_enabled

    @fold.setter
    def fold(self, enabled: bool) -> None:
        self._fold_enabled = bool(enabled)
        self._refold()

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "base_layer" and "_fold" in self.__dict__:  # a new base: the fold follows it
            self._refold()

    def _refold(self) -> _Fold | None:
        """Folds the first adapter under the base weight, or releases the fold when it may not
        be used (see :class:`_Fold`); returns the fold in use."""
        base = self.base_layer
        if self._fold is not None:
            self._fold.release()
            self._fold = None
        if self._fold_enabled and self._lad and isinstance(base, nn.Linear) and _Fold.applies(base):
            first = min(self._lad)
            self._fold = _Fold(base, first, self._lad[first])
        return self._fold

    def release(self) -> None:
        """Gives the base layer back its own weight (before it is unwrapped)."""
        self.fold = False

    def add_ladder(self, adapter: int, ladder: LadderModule, stack: bool = True) -> None:
        """Attaches adapter ``adapter``'s factors (moved to the base layer's device and dtype).
        ``stack``: restack the adapters (and fold) at once (see :meth:`stack_ladders`); adding
        several, pass False and call :meth:`stack_ladders` once after the last (until then the
        layer computes the same outputs, unstacked)."""
        w = self.base_layer.weight
        assert isinstance(w, torch.Tensor)
        a = ladder.a.to(device=w.device, dtype=w.dtype)
        b = prefix_layout(ladder.b.to(device=w.device, dtype=w.dtype))
        bias = None if ladder.bias is None else ladder.bias.to(device=w.device, dtype=w.dtype)
        self._register(adapter, a, b, bias)
        self._lad[adapter] = _Factors(a, b, bias, ladder.rank)
        self._sources[adapter] = ladder
        self._dtype = w.dtype
        self._any_bias = any(f.bias is not None for f in self._lad.values())
        if stack:
            self.stack_ladders()
        else:  # until stack_ladders: no grouped pass, and no fold of earlier factors
            self._stack = None
            if self._fold is not None and adapter <= self._fold.adapter:
                self._refold()

    def _register(self, adapter: int, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.register_buffer(f"ladder_a_{adapter}", a, persistent=False)
        self.register_buffer(f"ladder_b_{adapter}", b, persistent=False)
        self.register_buffer(f"ladder_bias_{adapter}", bias, persistent=False)

    def stack_ladders(self) -> None:
        """On the CPU, with adapters 0..n-1 (n >= 2) attached: copies their factors into one
        zero-padded tensor per side, which the grouped pass reads with one ``bmm``
        (:class:`~chunkwise.nn.token_plan.GroupedPass`); the layer's buffers, and the tensors of
        the ladders it was given where it shared them, become views of it, so the factors are
        held once per model (a ladder injected into two models is copied into each one's
        stacks). Not stacked, and left as they are: factors off the CPU, adapters whose ranks
        differ by more than :data:`STACK_MAX_PADDING` of padding, factors that record
        gradients (training them must reach the caller's tensors), other adapter numbers, or a
        layer built with ``stack=False``. Every call also folds (see :class:`_Fold`)."""
        self._stack = None
        lads = self._lad
        ranks = [f.rank for f in lads.values()]
        if (
            not self._stack_enabled
            or len(lads) < 2
            or set(lads) != set(range(len(lads)))
            or lads[0].a.device.type != "cpu"
            or len(lads) * max(ranks) > (1 + STACK_MAX_PADDING) * sum(ranks)
            or any(f.a.requires_grad or f.b.requires_grad for f in lads.values())
        ):
            self._refold()
            return
        top = max(ranks)
        ref = lads[0].a
        a = ref.new_zeros((len(lads), top, self.in_features))
        bt = ref.new_zeros((len(lads), top, self.out_features))
        with torch.no_grad():
            for i, f in lads.items():
                a[i, : f.rank] = f.a
                bt[i, : f.rank] = f.b.T
        for i, f in list(lads.items()):
            new = _Factors(a[i, : f.rank], bt[i, : f.rank].T, f.bias, f.rank)
            src = self._sources.get(i)
            if src is not None and src.a.data_ptr() == f.a.data_ptr():
                src.a = new.a
            if src is not None and src.b.data_ptr() == f.b.data_ptr():
                src.b = new.b
            self._register(i, new.a, new.b, f.bias)
            lads[i] = new
        self._stack = _Stack(a, bt)
        self._refold()

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """``.to()`` / ``.half()`` / ...: the buffers move, and the plain references follow."""
        out = super()._apply(fn, recurse)
        buffers = dict(self.named_buffers(recurse=False))
        for i, lad in self._lad.items():
            b = prefix_layout(buffers[f"ladder_b_{i}"])
            self.register_buffer(f"ladder_b_{i}", b, persistent=False)
            self._lad[i] = _Factors(buffers[f"ladder_a_{i}"], b, buffers.get(f"ladder_bias_{i}"), lad.rank)
        self._factors = None
        self._dtype = next(iter(self._lad.values())).a.dtype if self._lad else None
        self._fold = None  # the base layer's weight moved on its own: fold again
        stack = self._stack
        if stack is not None and all(
            f.a.untyped_storage().data_ptr() == stack.a.untyped_storage().data_ptr()
            and f.b.untyped_storage().data_ptr() == stack.bt.untyped_storage().data_ptr()
            for f in self._lad.values()
        ):  # a move that changed nothing, or share_memory(): the buffers still view the stack
            self._refold()
        else:  # the moved buffers into one stack again (or none off the CPU); folds
            self.stack_ladders()
        return out

    def _lora_factors(self) -> kernels.LoraFactors:
        """The ladders as the CUDA kernels read them; rebuilt when a buffer moved (.to())."""
        pairs = [
            (self._lad[i].a, self._lad[i].b) if i in self._lad else None for i in range(max(self._lad) + 1)
        ]
        key = tuple(t.data_ptr() for p in pairs if p is not None for t in p)
        if self._factors is None or self._factors[0] != key:
            self._factors = (key, kernels.LoraFactors(pairs))
        return self._factors[1]

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        plan = self._plan_source()
        fold = self._fold
        if fold is not None and plan is not None and not args and not kwargs:
            block = plan.whole
            if (
                block is not None
                and block.adapter == fold.adapter
                and plan.n_tokens <= FOLD_MAX_ROWS
                and x.dtype == fold.dtype
                and x.numel() == plan.n_tokens * self.in_features
                and not torch.is_grad_enabled()
                and (fold.current() or self._refolded(x))
            ):
                return self._fold.run(x, block)  # type: ignore[union-attr]  # _refolded set it
        y = self.base_layer(x, *args, **kwargs)
        dtype = self._dtype
        if plan is None or dtype is None:
            return y
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] != plan.n_tokens:
            raise StateError(
                f"plan: covers {plan.n_tokens} tokens but this forward has {x2.shape[0]}; "
                "set the plan for the inputs being run",
                "plan",
            )
        y2 = y.view(-1, self.out_features)
        if x2.dtype == y2.dtype == dtype:
            if plan.segments is not None and kernels.use_cuda_kernels(x2):
                self._cuda_delta(x2, y2, plan)
            else:
                self._deltas(x2, y2, plan)
            return y
        # activations of another dtype (autocast): the delta in the factors' dtype, added once
        out = torch.zeros_like(y2, dtype=dtype)
        with torch.autocast(x2.device.type, enabled=False):
            self._deltas(x2.to(dtype), out, plan)
        y2.add_(out.to(y2.dtype))
        return y

    def _refolded(self, x: torch.Tensor) -> bool:
        """Folds again after the base layer's weight or bias was replaced behind the fold;
        whether the new fold applies to ``x``."""
        fold = self._refold()
        return fold is not None and x.dtype == fold.dtype

    def _deltas(self, x2: torch.Tensor, y2: torch.Tensor, plan: TokenPlan) -> None:
        """The torch path: the plan's grouped pass when this layer has every adapter of it
        stacked, else every adapter block of the plan, into ``y2``."""
        g, stack = plan.grouped, self._stack
        weights = None if g is None or stack is None else stack.weights(g)
        if weights is None:
            for block in plan.blocks:
                lad = self._lad.get(block.adapter)
                if lad is not None:
                    self._block_delta(x2, y2, block, lad)
            return
        assert g is not None
        r = weights[0].shape[1]  # above every adapter's own rank the directions are zeros
        if r > 0:
            h = torch.bmm(x2.view(g.n, g.m, -1), weights[0].transpose(1, 2))
            if g.gates is not None:
                h.mul_(g.gates if g.gates.shape[2] == r else g.gates[:, :, :r])
            y2.view(g.n, g.m, -1).baddbmm_(h, weights[1], alpha=g.scale)
        for block in g.extra:
            self._block_delta(x2, y2, block, self._lad[block.adapter])
        self._biases(y2, plan)

    @staticmethod
    def _block_delta(x2: torch.Tensor, y2: torch.Tensor, block: AdapterBlock, lad: _Factors) -> None:
        """``y2[rows] += ((x2[rows] A'[col:r]ᵀ) ⊙ G) B'[:, col:r]ᵀ`` for one adapter block, plus
        lora_B's bias unless the block is a band (``col`` > 0)."""
        r, col = min(block.max_rank, lad.rank), block.col
        if block.span is not None:
            xs, ys = x2[block.span[0] : block.span[1]], y2[block.span[0] : block.span[1]]
        elif block.rows is None:
            xs, ys = x2, y2
        else:
            xs, ys = x2.index_select(0, block.rows), None
        if col > 0 and r <= col:
            return
        if r > 0:
            a_t, b_t = lad.band(col, r)
            h = xs @ a_t
            if block.gates is not None:
                h.mul_(block.gates if block.gates.shape[1] == r - col else block.gates[:, : r - col])
            if ys is not None:
                ys.addmm_(h, b_t, alpha=block.scale)
            else:
                assert block.rows is not None
                out = torch.mm(h, b_t)
                if block.scale != 1.0:
                    out.mul_(block.scale)
                if lad.bias is not None and col == 0:
                    out.add_(lad.bias)
                y2.index_add_(0, block.rows, out)
                return
        if lad.bias is None or col > 0:
            return
        if ys is not None:
            ys.add_(lad.bias)
        else:
            assert block.rows is not None
            y2.index_add_(0, block.rows, lad.bias.expand(len(block.rows), -1))

    def _cuda_delta(self, x2: torch.Tensor, y2: torch.Tensor, plan: TokenPlan) -> None:
        """The fused kernels: every adapter block at once, then the lora_B biases."""
        assert plan.segments is not None
        x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
        kernels.lora_delta_cuda(x2, y2, self._lora_factors(), plan.segments)
        self._biases(y2, plan)

    def _biases(self, y2: torch.Tensor, plan: TokenPlan) -> None:
        """lora_B's biases (``lora_bias=True``, at every rung) of every block's tokens, after a
        path that computed the blocks' products without them."""
        if not self._any_bias:
            return
        for block in plan.blocks:
            lad = self._lad.get(block.adapter)
            if lad is None or lad.bias is None:
                continue
            if block.span is not None:
                y2[block.span[0] : block.span[1]].add_(lad.bias)
            elif block.rows is None:
                y2.add_(lad.bias)
            else:
                y2.index_add_(0, block.rows, lad.bias.expand(len(block.rows), -1))
