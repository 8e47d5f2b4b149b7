"""Putting rank ladders into a ``transformers`` model, running it under plans, taking them out.

:func:`inject` checks everything before it changes anything: each ladder must adapt exactly the
modules its PEFT config targets on this model (a ladder never silently changes which modules
are adapted), shapes must fit, ``modules_to_save`` must name real parameters. On any error the
model is left exactly as it was. :meth:`ChunkwiseModel.unload` puts the original module objects
and parameters back.

A loaded ``peft.PeftModel`` may be injected as it is: its LoRA adapters (one or several, by
their PEFT names) become ladders from its in-memory weights, PEFT's layers are taken out (the
base model's own modules are put back, ``modules_to_save`` originals included), and the adapters
are then addressable by name as well as by index. What chunkwise cannot run (DoRA, other
tuners, LoRA on embeddings) is refused by name before anything changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from ..adapters.ladder import RankLadder
from ..errors import AdapterError, InputError
from ..schedule.plan import Plan
from ..schedule.scheduler import Scheduler
from .hf_generate import RankTrace
from .hf_generate import generate as hf_generate
from .linear import ChunkwiseLinear, linear_shape
from .token_plan import TokenPlan

__all__ = ["ChunkwiseModel", "inject"]


def _linear_names(model: nn.Module) -> frozenset[str]:
    """PEFT's "all-linear": every Linear / Conv1D except the output embedding."""
    names = {n for n, m in model.named_modules() if linear_shape(m) is not None}
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        names -= {n for n, m in model.named_modules() if m is out}
    return frozenset(names)


def _check_ladder(model: nn.Module, ladder: RankLadder, modules: dict[str, nn.Module]) -> None:
    all_linear = _linear_names(model)
    wanted = {
        n
        for n, m in modules.items()
        if linear_shape(m) is not None and ladder.settings.targets(n, all_linear)
    }
    have = set(ladder.modules)
    if not wanted:
        raise AdapterError(
            f"adapter {ladder.name!r}: its target_modules match no linear layer of this model",
            "target_modules",
        )
    if have - set(modules):
        missing = sorted(have - set(modules))[:5]
        raise AdapterError(
            f"adapter {ladder.name!r}: modules {missing} do not exist in this model", "target_modules"
        )
    if wanted != have:
        extra, lacking = sorted(have - wanted)[:5], sorted(wanted - have)[:5]
        raise AdapterError(
            f"adapter {ladder.name!r}: weights and config disagree on the adapted modules "
            f"(weights but not targeted: {extra}; targeted but no weights: {lacking})",
            "target_modules",
        )
    for name, lm in ladder.modules.items():
        fan_in, fan_out = linear_shape(modules[name]) or (None, None)
        if (lm.a.shape[1], lm.b.shape[0]) != (fan_in, fan_out):
            raise AdapterError(
                f"adapter {ladder.name!r}: module {name!r} is {fan_in}->{fan_out} but the ladder is "
                f"{lm.a.shape[1]}->{lm.b.shape[0]}",
                "adapter_model",
            )
    params = dict(model.named_parameters())
    for key, t in ladder.saved.items():
        if key not in params or params[key].shape != t.shape:
            raise AdapterError(
                f"adapter {ladder.name!r}: saved tensor {key!r} does not fit this model", "modules_to_save"
            )
        owner = key.rpartition(".")[0]
        if owner in ladder.modules:  # it would replace the weight of a layer the ladder wraps
            raise AdapterError(
                f"adapter {ladder.name!r}: saved tensor {key!r} belongs to {owner!r}, which the adapter "
                "also adapts with LoRA; a module is either adapted or saved whole, not both",
                "modules_to_save",
            )


def _check_ladders(model: nn.Module, ladders: list[RankLadder]) -> None:
    """Everything :func:`inject` refuses, checked before the model is touched."""
    if not ladders:
        raise AdapterError("ladders: give at least one ladder", "ladders")
    modules = dict(model.named_modules())
    if any(isinstance(m, ChunkwiseLinear) for m in modules.values()):
        raise AdapterError("model: already has chunkwise layers; unload() them first", "model")
    for lad in ladders:
        _check_ladder(model, lad, modules)
    if len(ladders) > 1 and any(lad.saved for lad in ladders):
        raise AdapterError(
            "ladders: an adapter with modules_to_save replaces whole modules for every sequence, so it "
            "cannot share a batch with other adapters; inject it alone",
            "modules_to_save",
        )


def _describe(value: object) -> str:
    if isinstance(value, list | tuple):
        return f"{type(value).__name__} of {sorted({type(v).__name__ for v in value}) or 'nothing'}"
    return type(value).__name__


class ChunkwiseModel:
    """A model with ladders injected. Use :meth:`plan` / :meth:`run` / :meth:`top_rung` to choose
    ranks per forward; :meth:`unload` restores the original model."""

    def __init__(
        self,
        model: nn.Module,
        ladders: RankLadder | Sequence[RankLadder],
        scheduler: Scheduler | None = None,
        *,
        fold: bool = True,
        stack: bool = True,
    ) -> None:
        """Checks every ladder against ``model``, then wraps the modules they adapt (the same as
        :func:`inject`). Raises :class:`AdapterError`, model untouched, when one does not fit.
        ``fold``: let decode steps run the base product and the shrink as one GEMM
        (:class:`ChunkwiseLinear`; hooks on a wrapped layer's ``base_layer`` then skip those
        steps). ``stack``: on the CPU, hold several adapters' factors of a layer in one tensor
        (the ladders' tensors become views of it) so that a batch with one adapter per row runs
        them in one batched matmul pair (:meth:`ChunkwiseLinear.stack_ladders`)."""
        if not isinstance(model, nn.Module):
            raise InputError(f"model: expected a torch.nn.Module, got {type(model).__name__}", "model")
        if isinstance(ladders, RankLadder):
            ladders = [ladders]
        elif (
            isinstance(ladders, list | tuple) and ladders and all(isinstance(x, RankLadder) for x in ladders)
        ):
            ladders = list(ladders)
        else:
            raise AdapterError(
                f"ladders: expected a RankLadder or a non-empty list of them, got {_describe(ladders)}",
                "ladders",
            )
        if scheduler is not None and not isinstance(scheduler, Scheduler):
            raise InputError(
                f"scheduler: expected a chunkwise.Scheduler or None, got {type(scheduler).__name__}",
                "scheduler",
            )
        _check_ladders(model, ladders)
        self.model = model
        self.ladders = ladders
        self.scheduler = scheduler if scheduler is not None else Scheduler()
        self._current: TokenPlan | None = None
        self._wrapped: dict[str, tuple[nn.Module, nn.Module]] = {}
        self._saved_params: dict[str, torch.Tensor] = {}
        #: The ranks of the last :meth:`generate` call (None before the first).
        self.last_trace: RankTrace | None = None
        self._fold = bool(fold)
        self._stack = bool(stack)
        self._attach()

    # -- injection -------------------------------------------------------------------------
    def _attach(self) -> None:
        """Wraps the adapted modules and swaps in ``modules_to_save``; all or nothing: on any
        failure half-way the model is put back as it was and the error propagates."""
        try:
            self._attach_all()
        except BaseException:
            self.unload()
            raise

    def _attach_all(self) -> None:
        modules = dict(self.model.named_modules())
        names = sorted({n for lad in self.ladders for n in lad.modules})
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = modules[parent_name] if parent_name else self.model
            base = modules[name]
            layer = ChunkwiseLinear(base, lambda: self._current, fold=self._fold, stack=self._stack)
            for i, lad in enumerate(self.ladders):
                if name in lad.modules:
                    layer.add_ladder(i, lad.modules[name], stack=False)
            layer.stack_ladders()  # several adapters on the CPU: one tensor per side; folds
            setattr(parent, child, layer)
            self._wrapped[name] = (parent, base)
        params = dict(self.model.named_parameters())
        for lad in self.ladders:
            for key, t in lad.saved.items():
                p = params[key]
                if key not in self._saved_params:  # a second adapter saving it: keep the original
                    self._saved_params[key] = p.detach().clone()
                with torch.no_grad():
                    p.copy_(t.to(p.dtype))

    def unload(self) -> nn.Module:
        """Removes every ladder and returns the original model (same module objects, same weights)."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for key, t in self._saved_params.items():
                params[key].copy_(t)
        for name, (parent, base) in self._wrapped.items():
            child = name.rpartition(".")[2]
            layer = getattr(parent, child)
            if isinstance(layer, ChunkwiseLinear):
                layer.release()  # the base weight stands alone again
            setattr(parent, child, base)
        self._wrapped.clear()
        self._saved_params.clear()
        self._current = None
        return self.model

    # -- plans -----------------------------------------------------------------------------
    def device_dtype(self) -> tuple[torch.device, torch.dtype]:
        """Device and dtype of the model's parameters (what plans are laid out in)."""
        p = next(self.model.parameters())
        return p.device, p.dtype

    @contextlib.contextmanager
    def use(self, token_plan: TokenPlan | None) -> Iterator[None]:
        """Runs forwards inside the block under ``token_plan`` (None: base model only)."""
        previous, self._current = self._current, token_plan
        try:
            yield
        finally:
            self._current = previous

    def token_plan(
        self,
        plan: Plan,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        adapters: npt.ArrayLike | None = None,
    ) -> TokenPlan:
        """Lays ``plan`` over a [batch, seq] input (see :meth:`TokenPlan.from_plan`)."""
        device, dtype = self.device_dtype()
        ad = None if adapters is None else self.adapter_ids(adapters, input_ids.shape[0])
        return TokenPlan.from_plan(
            plan, attention_mask, (int(input_ids.shape[0]), int(input_ids.shape[1])), ad, device, dtype
        )

    def top_rung(self, input_ids: torch.Tensor, adapters: npt.ArrayLike | None = None) -> TokenPlan:
        """Every token at each module's full rank: reproduces PEFT's output."""
        device, dtype = self.device_dtype()
        b, t = input_ids.shape
        ad = self.adapter_ids(adapters, b)
        top = max(lad.max_rank for lad in self.ladders)
        return TokenPlan.uniform(b * t, top, np.repeat(ad, t), device, dtype)

    @property
    def adapter_names(self) -> list[str]:
        """The name of each adapter (its ladder's name; a PeftModel's adapter names), by id."""
        return [lad.name for lad in self.ladders]

    def adapter_ids(self, adapters: npt.ArrayLike | Sequence[str] | None, batch: int) -> np.ndarray:
        """``adapters`` (one id or adapter name per sequence, default all 0) checked against the
        ladders: int32."""
        if adapters is None:
            return np.zeros(batch, np.int32)
        ad = np.asarray(adapters).reshape(-1)
        if ad.dtype.kind in "US":
            names = self.adapter_names
            unknown = sorted({str(a) for a in ad} - set(names))
            if unknown or len(set(names)) != len(names):
                why = f"unknown {unknown}" if unknown else f"ambiguous: two adapters share a name in {names}"
                raise InputError(f"adapters: names {why}; the adapters are {names}", "adapters")
            ad = np.array([names.index(str(a)) for a in ad], np.int32)
        if len(ad) != batch or ad.dtype.kind not in "iu":
            raise InputError(f"adapters: need {batch} integer adapter ids, got {ad.tolist()}", "adapters")
        if ad.min() < 0 or ad.max() >= len(self.ladders):
            raise InputError(
                f"adapters: ids must be in [0, {len(self.ladders)}), got {ad.tolist()}", "adapters"
            )
        return ad.astype(np.int32)

    def plan_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        adapters: npt.ArrayLike | None = None,
        **signals: Any,
    ) -> Plan:
        """Plans a [batch, seq] input with the scheduler, from its token ids (and any per-token
        signals given as lists per sequence)."""
        ids = input_ids.detach().to("cpu").numpy().astype(np.int64)
        if attention_mask is None:
            seqs = list(ids)
        else:
            mask = attention_mask.detach().to("cpu").numpy().astype(bool)
            seqs = [row[m] for row, m in zip(ids, mask, strict=True)]
        ad = self.adapter_ids(adapters, ids.shape[0])
        return self.scheduler.plan(seqs, adapters=ad, **signals)

    def run(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        plan: Plan | None = None,
        adapters: npt.ArrayLike | None = None,
        **kwargs: Any,
    ) -> Any:
        """One forward of the model under ``plan`` (default: planned from the inputs)."""
        if plan is None:
            plan = self.plan_inputs(input_ids, attention_mask, adapters)
        tp = self.token_plan(plan, input_ids, attention_mask, adapters)
        with self.use(tp):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        adapters: npt.ArrayLike | Sequence[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """transformers' own ``generate`` on the model, each token at the rank the scheduler
        picks for it (the prompt planned as one chunk, then the streaming decoder fed with the
        entropy and surprisal of the raw logits that predicted each token, as in
        :func:`chunkwise.generate`); returns exactly what ``model.generate`` returns.

        Every option of ``generate`` that keeps one sequence per row works: greedy, sampling,
        top-k / top-p, logits processors, stopping criteria, streamers,
        ``return_dict_in_generate``, ``num_return_sequences``, left-padded batches. A
        :class:`~chunkwise.kv.PolicyCache` may be given as ``cache=`` / ``past_key_values=``
        (built with the prompt's ``attention_mask``), or ``policy=`` a
        :class:`~chunkwise.kv.KvPolicy` builds one (per row, as :func:`chunkwise.generate`
        does). ``adapters``: one adapter id or name per input row. The ranks used are then in
        :attr:`last_trace` (a :class:`~chunkwise.nn.RankTrace`). Beam search, assisted decoding,
        chunked prefill, ``inputs_embeds`` and ``use_cache=False`` raise :class:`InputError`.
        """
        out, self.last_trace = hf_generate(self, input_ids, attention_mask, adapters, **kwargs)
        return out


def _is_peft_model(model: object) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # without peft nothing is a PeftModel
        return False
    return isinstance(model, PeftModel)


def _from_peft_model(peft_model: Any, scheduler: Scheduler | None, fold: bool, stack: bool) -> ChunkwiseModel:
    """Ladders of every LoRA adapter of ``peft_model``, PEFT's layers out, ladders in."""
    from peft.utils import ModulesToSaveWrapper

    ladders = [RankLadder.from_peft_model(peft_model, name) for name in peft_model.peft_config]
    inner = peft_model.get_base_model()  # the transformers model, PEFT layers inside
    modules = dict(inner.named_modules())
    for lad in ladders:
        for name, mod in lad.modules.items():
            layer = modules.get(name)
            base = getattr(layer, "base_layer", None)
            shape = None if not isinstance(base, nn.Module) else linear_shape(base)
            if shape != (mod.a.shape[1], mod.b.shape[0]):
                raise AdapterError(
                    f"adapter {lad.name!r}: module {name!r} is not a LoRA layer over a Linear / Conv1D of "
                    f"shape ({mod.a.shape[1]}, {mod.b.shape[0]}) in this PeftModel "
                    f"(found {type(layer).__name__})",
                    "peft_model",
                )
    wrappers = {name: m for name, m in modules.items() if isinstance(m, ModulesToSaveWrapper)}
    originals = {name: m.original_module for name, m in wrappers.items()}
    model = peft_model.unload()  # (it leaves the trained modules_to_save copies in place)
    for name, original in originals.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, original)
    return ChunkwiseModel(model, ladders, scheduler, fold=fold, stack=stack)


def inject(
    model: nn.Module,
    ladders: RankLadder | Sequence[RankLadder] | None = None,
    scheduler: Scheduler | None = None,
    *,
    fold: bool = True,
    stack: bool = True,
) -> ChunkwiseModel:
    """Wraps every module any ladder adapts with :class:`ChunkwiseLinear`.

    Adapter i of a batch is ``ladders[i]``. Raises :class:`AdapterError` (model untouched) when a
    ladder does not fit the model. ``model`` may also be a loaded ``peft.PeftModel`` (then no
    ``ladders``): its LoRA adapters become the ladders, in the order of ``peft_config``, named
    as in PEFT; the returned model's :meth:`ChunkwiseModel.unload` gives the base model back.
    ``fold=False`` keeps every step dispatching through the base layers (their hooks run).
    ``stack=False`` leaves several adapters' factors apart (each its own pair of matmuls per
    forward, the ladders' tensors untouched); see :class:`ChunkwiseModel`.
    """
    if _is_peft_model(model):
        if ladders is not None:
            raise InputError(
                "ladders: a PeftModel brings its own adapters; pass no ladders (or pass the base model "
                "with ladders)",
                "ladders",
            )
        return _from_peft_model(model, scheduler, fold, stack)
    if ladders is None:
        raise AdapterError("ladders: inject needs a RankLadder or a list of them (or a PeftModel)", "ladders")
    return ChunkwiseModel(model, ladders, scheduler, fold=fold, stack=stack)
