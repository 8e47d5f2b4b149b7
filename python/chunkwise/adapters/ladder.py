"""Rank ladders: every LoRA module factored once so each rank k is a prefix of one tensor.

For a module with update ``s · B A`` (PEFT's scaling s), the SVD ``s·B A = U Σ Vᵀ`` gives
``B' = U Σ^½`` and ``A' = Σ^½ Vᵀ``: the first k rows of A' and columns of B' are the best rank-k
approximation of the update (Eckart–Young), and the full tensors reproduce it exactly. The SVD is
taken of the small r×r core of two QR factorisations, in float64, so conversion is cheap even
for wide layers. A ladder is stored beside the adapter (``chunkwise_ladder.safetensors``) without
touching PEFT's own files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import torch

from ..errors import AdapterError, InputError
from .files import CONFIG_FILE, LADDER_FILE, atomic_write, regular_file
from .settings import LoraSettings, read_config, settings_from_dict
from .weights import AdapterWeights, read_weights, weights_from_tensors

__all__ = ["LadderModule", "RankLadder", "LADDER_FILE", "factor_update", "prefix_layout"]

_FORMAT = "chunkwise-ladder/1"


def prefix_layout(b: torch.Tensor) -> torch.Tensor:
    """B' [out, R] stored the way its device reads rank prefixes fastest.

    On the CPU, as the transposed view of a contiguous [R, out] tensor: the expand reads
    ``B'[:, :r]ᵀ``, which is then r contiguous rows instead of ``out`` strided pieces of rows
    (at decode rank 8 of 64 the strided prefix cost ~2 ms more per SmolLM2 token over its 210
    modules). Elsewhere contiguous [out, R], as the CUDA kernels read it. Ladders are built in
    this layout, so the layers that use them share their tensors rather than copy them."""
    if b.device.type == "cpu":
        return b if b.T.is_contiguous() else b.T.contiguous().T
    return b.contiguous()


@dataclasses.dataclass
class LadderModule:
    """Nested factors of one module: ``a`` [r, in] and ``b`` [out, r] with the scaling folded in;
    ``bias`` [out] is PEFT's ``lora_B`` bias times the scaling (applied at every rung)."""

    a: torch.Tensor
    b: torch.Tensor
    bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.b = prefix_layout(self.b)

    @property
    def rank(self) -> int:
        """The module's full rank (rungs above it are clamped to it)."""
        return int(self.a.shape[0])

    def update(self, k: int | None = None) -> torch.Tensor:
        """The rank-k update ``B'[:, :k] A'[:k]`` as a dense [out, in] matrix (for tests)."""
        k = self.rank if k is None else min(k, self.rank)
        return self.b[:, :k] @ self.a[:k]


def factor_update(a: torch.Tensor, b: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Nested factors (A', B') of ``scale · b @ a`` in float64, singular values descending; their
    rank is min(r, in, out)."""
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    qb, rb = torch.linalg.qr(b64)  # b = qb rb, qb [out, r]
    qa, ra = torch.linalg.qr(a64.T)  # aᵀ = qa ra, qa [in, r]
    # Thin SVD: a LoRA rank above min(in, out) (PEFT allows it) leaves min(r, in, out) directions.
    core = scale * rb @ ra.T
    if not bool(torch.isfinite(core).all()):
        raise AdapterError(
            f"scale * lora_B @ lora_A overflows float64 (scale {scale}); the factors are too large", "weights"
        )
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    root = s.sqrt()
    return (root[:, None] * (vh @ qa.T)), ((qb @ u) * root[None, :])


def _json_value(value: object) -> object:
    """How ``save_pretrained`` writes what JSON has no type for: sets as sorted lists."""
    return sorted(value) if isinstance(value, set | frozenset) else str(value)


@dataclasses.dataclass
class RankLadder:
    """The ladder of one adapter: nested factors per module, plus what PEFT needs to match it."""

    modules: dict[str, LadderModule]
    settings: LoraSettings
    saved: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    name: str = "default"
    config: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_peft(
        cls, path: str | Path, name: str | None = None, dtype: torch.dtype = torch.float32
    ) -> RankLadder:
        """Converts the PEFT adapter directory ``path`` (config + safetensors or .bin)."""
        config = read_config(path)
        path = Path(path)
        settings = settings_from_dict(config, str(path / CONFIG_FILE))  # before the weights: name the option
        return cls._convert(config, settings, read_weights(path), str(path), name or path.name, dtype)

    @classmethod
    def from_peft_model(
        cls, peft_model: object, adapter_name: str = "default", dtype: torch.dtype = torch.float32
    ) -> RankLadder:
        """Converts adapter ``adapter_name`` of a loaded ``peft.PeftModel`` from its in-memory
        config and weights (what ``save_pretrained`` would write; nothing is written), with the
        same checks as :meth:`from_peft`: DoRA, non-LoRA tuners and unsupported options are
        refused by name."""
        configs = getattr(peft_model, "peft_config", None)
        if not isinstance(configs, dict) or not configs:
            raise AdapterError(
                f"peft_model: expected a loaded peft.PeftModel, got {type(peft_model).__name__}", "peft_model"
            )
        if adapter_name not in configs:
            raise AdapterError(
                f"adapter_name: {adapter_name!r} is not an adapter of this PeftModel ({sorted(configs)})",
                "adapter_name",
            )
        cfg = configs[adapter_name]
        where = f"PeftModel adapter {adapter_name!r}"
        # the dict save_pretrained writes as JSON (sets become lists, enums their values)
        config = json.loads(json.dumps(cfg.to_dict(), default=_json_value))
        if config.get("peft_type") != "LORA":
            raise AdapterError(f"{where}: peft_type {config.get('peft_type')!r} is not LORA", "peft_type")
        settings = settings_from_dict(config, where)
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name, save_embedding_layers=False)
        weights = weights_from_tensors({k: v.detach().to("cpu") for k, v in state.items()}, where)
        return cls._convert(config, settings, weights, where, adapter_name, dtype)

    @classmethod
    def _convert(
        cls,
        config: dict,
        settings: LoraSettings,
        weights: AdapterWeights,
        where: str,
        name: str,
        dtype: torch.dtype,
    ) -> RankLadder:
        """The ladder of an adapter's checked config and its weights (``where`` names them in
        errors)."""
        modules = {}
        stray = sorted(m for m, w in weights.modules.items() if w.bias is not None and not settings.lora_bias)
        if stray:
            # PEFT builds no lora_B bias unless the config asks for one, and loads the file's
            # tensor nowhere; so does the ladder, but not silently
            warnings.warn(
                f"{where}: lora_B.bias tensors of {len(stray)} module(s) ({stray[0]!r}, ...) are ignored: "
                "the config says lora_bias: false (as PEFT ignores them)",
                UserWarning,
                stacklevel=3,
            )
        for mod, w in weights.modules.items():
            r, _ = settings.rank_alpha(mod)
            if w.a.shape[0] != r:
                raise AdapterError(
                    f"{where}: module {mod!r} has rank {w.a.shape[0]} but the config "
                    f"(r / rank_pattern) says {r}",
                    "rank_pattern",
                )
            s = settings.scaling(mod)
            a, b = factor_update(w.a, w.b, s)
            bias = None if w.bias is None or mod in stray else (s * w.bias.to(torch.float64)).to(dtype)
            module = LadderModule(a.to(dtype), b.to(dtype), bias)
            if not all(
                bool(torch.isfinite(t).all()) for t in (module.a, module.b, module.bias) if t is not None
            ):
                raise AdapterError(
                    f"{where}: module {mod!r}: the scaled factors overflow {dtype} (values too large)",
                    "weights",
                )
            modules[mod] = module
        return cls(modules, settings, weights.saved, name, config)

    @property
    def max_rank(self) -> int:
        """The largest module rank."""
        return max(m.rank for m in self.modules.values())

    def energy(self, rank: int) -> float:
        """Mean over modules of the share of the update's squared Frobenius norm kept by the
        rank-``rank`` prefix (``sum_{j<k} σ_j² / sum_j σ_j²``, σ_j = ||A'_j||·||B'_:j||)."""
        shares = []
        for m in self.modules.values():
            sigma2 = (m.a.double().norm(dim=1) * m.b.double().norm(dim=0)) ** 2
            total = float(sigma2.sum())
            shares.append(float(sigma2[:rank].sum()) / total if total > 0 else 1.0)
        return sum(shares) / len(shares)

    def check_rank(self, rank: object) -> int:
        """``rank`` as a rung of this ladder (an int in 1..max_rank), else :class:`InputError`
        naming it."""
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= self.max_rank:
            raise InputError(
                f"rank: expected an integer from 1 to the ladder's top rank {self.max_rank}, got {rank!r}",
                "rank",
            )
        return rank

    def truncated(self, rank: int) -> RankLadder:
        """This ladder cut to its rank-``rank`` prefixes (modules of lower rank keep theirs): the
        best rank-``rank`` approximation of every update, and itself a ladder of it (the prefixes
        of SVD factors are SVD factors). Shares the tensors; nothing is copied."""
        rank = self.check_rank(rank)
        modules = {mod: LadderModule(m.a[:rank], m.b[:, :rank], m.bias) for mod, m in self.modules.items()}
        return RankLadder(modules, self.settings, dict(self.saved), self.name, dict(self.config))

    def to_peft(self, path: str | Path, rank: int | None = None, *, overwrite: bool = False) -> Path:
        """Writes this ladder (cut to ``rank`` if given) as an ordinary PEFT LoRA folder that any
        PEFT consumer loads (vLLM included): see :func:`chunkwise.adapters.export.write_peft`."""
        from .export import write_peft

        return write_peft(self, path, rank, overwrite=overwrite)

    def flat_tensors(self, keys: dict[str, str], saved: str) -> dict[str, torch.Tensor]:
        """Every tensor of the ladder, contiguous, by file key: a module's ``a``, ``b`` and
        ``bias`` under ``keys[part].format(module)``, a saved tensor under ``saved.format(name)``
        (the ladder file's keys and the PEFT export's are two such sets)."""
        out: dict[str, torch.Tensor] = {}
        for mod, m in self.modules.items():
            for part, t in (("a", m.a), ("b", m.b), ("bias", m.bias)):
                if t is not None:
                    out[keys[part].format(mod)] = t.contiguous()
        for name, t in self.saved.items():
            out[saved.format(name)] = t.contiguous()
        return out

    def save(self, path: str | Path) -> Path:
        """Writes ``chunkwise_ladder.safetensors`` into directory ``path`` (beside a PEFT adapter
        is fine: PEFT reads only its own files). Returns the file path."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = self.flat_tensors(
            {"a": "ladder.{}.a", "b": "ladder.{}.b", "bias": "ladder.{}.bias"}, "saved.{}"
        )
        meta = {"format": _FORMAT, "name": self.name, "adapter_config": json.dumps(self.config)}
        return atomic_write(path / LADDER_FILE, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | Path, name: str | None = None) -> RankLadder:
        """Reads a ladder written by :meth:`save` (``path``: the file or its directory)."""
        from safetensors import SafetensorError, safe_open

        if not isinstance(path, str | os.PathLike):
            raise AdapterError(f"path: expected a str or Path, got {type(path).__name__}", "path")
        path = Path(path)
        file = path / LADDER_FILE if path.is_dir() else path
        try:
            regular_file(file, "ladder")
            with safe_open(str(file), "pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iter
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise AdapterError(f"{file}: not a readable ladder ({e})", "ladder") from None
        if meta.get("format") != _FORMAT:
            raise AdapterError(f"{file}: unknown ladder format {meta.get('format')!r}", "ladder")
        try:
            config = json.loads(meta.get("adapter_config", "{}"))
        except (ValueError, RecursionError) as e:
            raise AdapterError(f"{file}: its adapter_config metadata is not JSON ({e})", "ladder") from None
        if not isinstance(config, dict):
            raise AdapterError(f"{file}: its adapter_config metadata is not a JSON object", "ladder")
        for k, t in tensors.items():
            if not t.dtype.is_floating_point:
                raise AdapterError(f"{file}: tensor {k!r} is {t.dtype}, not a float type", "ladder")
            if not bool(torch.isfinite(t).all()):
                raise AdapterError(f"{file}: tensor {k!r} holds NaN or inf", "ladder")
        parts: dict[str, dict[str, torch.Tensor]] = {}
        saved = {}
        for k, t in tensors.items():
            if k.startswith("saved."):
                saved[k[len("saved.") :]] = t
            elif k.startswith("ladder."):
                mod, _, part = k[len("ladder.") :].rpartition(".")
                parts.setdefault(mod, {})[part] = t
        modules = {}
        for mod, p in parts.items():
            a, b, bias = p.get("a"), p.get("b"), p.get("bias")
            if (
                a is None
                or b is None
                or a.ndim != 2
                or b.ndim != 2
                or a.shape[0] != b.shape[1]
                or (bias is not None and tuple(bias.shape) != (b.shape[0],))
            ):
                raise AdapterError(f"{file}: module {mod!r} has inconsistent factors", "ladder")
            modules[mod] = LadderModule(p["a"], p["b"], p.get("bias"))
        return cls(
            modules, settings_from_dict(config, str(file)), saved, name or meta.get("name", "default"), config
        )
