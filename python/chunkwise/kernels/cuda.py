"""CuPy launch of the segmented LoRA kernels (``segmented_lora.cu``) on torch tensors.

The source ships inside the package and is found with :mod:`importlib.resources`; it is compiled
once per device with CuPy's NVRTC (:class:`cupy.RawModule`) on first use and cached. Kernels
run on torch's current stream and take torch tensors by pointer: nothing is copied, and no call
synchronises with the host, so a decode step can be captured in a CUDA graph once the module is
loaded (call once before capturing) and the factors are a prebuilt :class:`LoraFactors`.

``CHUNKWISE_KERNELS`` = ``auto`` (default: CUDA kernels when CuPy and a CUDA device are present,
torch otherwise), ``cuda`` (required: a :class:`~chunkwise.ConfigError` says why they cannot run)
or ``torch`` (never the CUDA kernels).
"""

from __future__ import annotations

import functools
import importlib.resources
import os
import sys
import sysconfig
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import torch

from ..errors import ConfigError, InputError, KernelError
from .segments import SegmentArrays

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "DTYPE_SUFFIX",
    "ENV_VAR",
    "KERNEL_NAMES",
    "KERNEL_CONSTANTS",
    "LaunchTuning",
    "check_tuning",
    "TILE_M",
    "kernel_defines",
    "KernelError",
    "Launch",
    "LoraFactors",
    "NvrtcOutput",
    "compile_options",
    "cuda_include_dirs",
    "cuda_kernels_available",
    "cuda_unavailable_reason",
    "kernel_backend",
    "kernel_source",
    "lora_delta_cuda",
    "nvrtc_compile",
    "plan_launches",
    "use_cuda_kernels",
]

SOURCE_NAME = "segmented_lora.cu"
ENV_VAR = "CHUNKWISE_KERNELS"
#: The kernels' launch geometry, written only here: each is passed to NVRTC (and to the CPU
#: emulator) as ``-DLORA_<NAME>=value`` and the grids below are computed from the same numbers.
KERNEL_CONSTANTS: dict[str, int] = {
    "TILE_M": 32,  # tokens per block of shrink / expand (16, 32 or 64)
    "THREADS": 128,  # threads per block of shrink / expand
    "SHRINK_KC": 64,  # input features per shared-memory chunk of the shrink
    "EXPAND_TN": 64,  # output features per block of the expand
    "MAP_THREADS": 1024,  # threads of the one-block lora_tile_map
}
#: Tokens per block (``KERNEL_CONSTANTS["TILE_M"]``).
TILE_M = KERNEL_CONSTANTS["TILE_M"]
_THREADS = KERNEL_CONSTANTS["THREADS"]
_MAP_THREADS = KERNEL_CONSTANTS["MAP_THREADS"]
_SHRINK_KC = KERNEL_CONSTANTS["SHRINK_KC"]
_EXPAND_TN = KERNEL_CONSTANTS["EXPAND_TN"]

#: Kernel-name suffix of each supported dtype (x, y and the factors share it).
DTYPE_SUFFIX: dict[torch.dtype, str] = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_VARIANTS = ("f32_simt", "f16_simt", "f16_mma", "bf16_simt", "bf16_mma")
#: Every entry point of the source.
KERNEL_NAMES: tuple[str, ...] = (
    "lora_tile_map",
    *(f"lora_{stage}_{v}" for v in _VARIANTS for stage in ("shrink", "expand")),
)


# ---- source and compilation --------------------------------------------------------------


def kernel_source() -> str:
    """The CUDA source, read from the installed package."""
    return importlib.resources.files(__package__).joinpath(SOURCE_NAME).read_text(encoding="utf-8")


def cuda_include_dirs() -> list[str]:
    """Folders holding ``cuda_fp16.h``: a CUDA toolkit's first (CUDA_PATH, CUDA_HOME,
    /usr/local/cuda), then the headers of the ``nvidia-*`` wheels that torch installs."""
    candidates: list[Path] = []
    for var in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path}
    for root in sorted(r for r in roots if r):
        nv = Path(root) / "nvidia"
        for sub in ("cu13/include", "cuda_runtime/include", "cu12/include"):
            candidates.append(nv / sub)
    out: list[str] = []
    for c in candidates:
        if (c / "cuda_fp16.h").is_file() and str(c) not in out:
            out.append(str(c))
    return out


def kernel_defines() -> tuple[str, ...]:
    """``-DLORA_<NAME>=value`` for every entry of :data:`KERNEL_CONSTANTS` (the source refuses
    to compile without them)."""
    return tuple(f"-DLORA_{name}={value}" for name, value in KERNEL_CONSTANTS.items())


def compile_options(include_dirs: Sequence[str] | None = None) -> tuple[str, ...]:
    """NVRTC options of the source (without the architecture)."""
    dirs = cuda_include_dirs() if include_dirs is None else list(include_dirs)
    return ("-std=c++17", *kernel_defines(), *(f"-I{d}" for d in dirs))


@dataclass(frozen=True)
class NvrtcOutput:
    """What :func:`nvrtc_compile` produced: the PTX or CUBIN bytes and NVRTC's log."""

    arch: str
    code: bytes
    log: str


def nvrtc_compile(arch: str = "sm_90", *, ptx: bool = False, ptxas_verbose: bool = False) -> NvrtcOutput:
    """Compiles the source with NVRTC through ``cuda.bindings`` (no GPU needed).

    ``arch`` is ``sm_XX`` (CUBIN, through ptxas) or ``compute_XX`` (PTX). Raises
    :class:`KernelError` with NVRTC's log when compilation fails, ImportError when
    ``cuda.bindings`` or the NVRTC library is missing.
    """
    from cuda.bindings import nvrtc

    def check(result: Any, what: str) -> Any:
        err, *rest = result
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise KernelError(f"nvrtc: {what} failed: {err}")
        return rest[0] if len(rest) == 1 else rest

    ptx = ptx or arch.startswith("compute_")
    prog = check(
        nvrtc.nvrtcCreateProgram(kernel_source().encode(), SOURCE_NAME.encode(), 0, [], []), "create"
    )
    try:
        opts = [f"--gpu-architecture={arch}", *compile_options()]
        if ptxas_verbose and not ptx:
            opts.append("--ptxas-options=-v")
        raw = [o.encode() for o in opts]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(raw), raw)
        # NVRTC writes into the buffers it is given: they must be fresh writable memory. (A
        # `b" " * size` of size 1 is CPython's interned b" ": NVRTC overwrote it with NUL
        # process-wide, and torch.save then wrote empty tensors.)
        size = check(nvrtc.nvrtcGetProgramLogSize(prog), "log size")
        log = bytearray(size)
        check(nvrtc.nvrtcGetProgramLog(prog, log), "log")
        text = bytes(log).rstrip(b"\0 ").decode(errors="replace")
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise KernelError(f"nvrtc: compiling {SOURCE_NAME} for {arch} failed ({err}):\n{text}")
        if ptx:
            size = check(nvrtc.nvrtcGetPTXSize(prog), "PTX size")
            code = bytearray(size)
            check(nvrtc.nvrtcGetPTX(prog, code), "PTX")
        else:
            size = check(nvrtc.nvrtcGetCUBINSize(prog), "CUBIN size")
            code = bytearray(size)
            check(nvrtc.nvrtcGetCUBIN(prog, code), "CUBIN")
        return NvrtcOutput(arch, bytes(code), text)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


# ---- availability and the backend switch -------------------------------------------------


@functools.cache
def cuda_unavailable_reason() -> str | None:
    """Why the CUDA kernels cannot run in this process, or None when they can."""
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    try:
        import cupy
    except Exception as exc:  # ImportError, or a CuPy that fails to find its CUDA libraries
        return f"cupy is not importable ({type(exc).__name__}: {exc}); install chunkwise[cuda]"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "cupy sees no CUDA device"
    except Exception as exc:
        return f"cupy cannot reach the CUDA device ({type(exc).__name__}: {exc})"
    return None


def cuda_kernels_available() -> bool:
    """True when CuPy and a CUDA device are present (the kernels may still fail to compile)."""
    return cuda_unavailable_reason() is None


def kernel_backend() -> str:
    """``"cuda"`` or ``"torch"``, from ``CHUNKWISE_KERNELS`` (read at every call)."""
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in ("auto", "cuda", "torch"):
        raise ConfigError(f"{ENV_VAR}: must be auto, cuda or torch, got {mode!r}", ENV_VAR)
    if mode == "torch":
        return "torch"
    reason = cuda_unavailable_reason()
    if reason is None:
        return "cuda"
    if mode == "cuda":
        raise ConfigError(f"{ENV_VAR}=cuda: the CUDA kernels cannot run here: {reason}", ENV_VAR)
    return "torch"


def use_cuda_kernels(x: torch.Tensor) -> bool:
    """Whether a layer should send ``x`` (its input) through the CUDA kernels: the backend is
    ``cuda`` and ``x`` is a CUDA tensor of a supported dtype. Raises ConfigError when
    ``CHUNKWISE_KERNELS=cuda`` cannot be honoured, whatever the device of ``x``."""
    return kernel_backend() == "cuda" and x.is_cuda and x.dtype in DTYPE_SUFFIX


# ---- factors -----------------------------------------------------------------------------


class LoraFactors:
    """One layer's ladder factors, adapter by adapter, as the kernels read them.

    ``factors[a]`` is ``(A', B')`` with A' [R_a, in] and B' [out, R_a] (contiguous, one dtype and
    device for all), or None where adapter a does not adapt this layer. Only rank prefixes are
    read; adapters may have different R_a. On a CUDA device the pointer and rank tables are built
    once here (one small copy): build one per layer and reuse it (required inside CUDA graphs).
    On the CPU the tables hold host pointers (for the kernel emulator of the tests).
    The tensors are kept alive by this object.
    """

    def __init__(self, factors: Sequence[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        pairs: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        in_f = out_f = None
        dtype = device = None
        for i, pair in enumerate(factors):
            if pair is None:
                pairs.append(None)
                continue
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise InputError(f"factors[{i}]: must be an (A, B) pair or None", "factors")
            a, b = pair
            if (
                not isinstance(a, torch.Tensor)
                or not isinstance(b, torch.Tensor)
                or a.dim() != 2
                or b.dim() != 2
            ):
                raise InputError(f"factors[{i}]: A and B must be 2-d tensors", "factors")
            if a.shape[0] != b.shape[1]:
                raise InputError(
                    f"factors[{i}]: A is {tuple(a.shape)} and B {tuple(b.shape)}; "
                    "expected A [R, in] and B [out, R]",
                    "factors",
                )
            if not (a.is_contiguous() and b.is_contiguous()):
                raise InputError(f"factors[{i}]: A and B must be contiguous", "factors")
            if a.dtype not in DTYPE_SUFFIX or b.dtype != a.dtype:
                raise InputError(
                    f"factors[{i}]: dtypes {a.dtype}, {b.dtype} (float32/16, bfloat16, equal)", "factors"
                )
            if dtype is None:
                dtype, device, in_f, out_f = a.dtype, a.device, int(a.shape[1]), int(b.shape[0])
            if (a.dtype, a.device, b.device, int(a.shape[1]), int(b.shape[0])) != (
                dtype,
                device,
                device,
                in_f,
                out_f,
            ):
                raise InputError(
                    f"factors[{i}]: {a.dtype} on {a.device}, in={a.shape[1]}, out={b.shape[0]} differs "
                    f"from the first adapter's {dtype} on {device}, in={in_f}, out={out_f}",
                    "factors",
                )
            pairs.append((a, b))
        self.pairs = tuple(pairs)
        self.n_adapters = len(pairs)
        self.in_features: int | None = in_f
        self.out_features: int | None = out_f
        self.dtype: torch.dtype | None = dtype
        self.device: torch.device | None = device
        self.ranks = tuple(0 if p is None else int(p[0].shape[0]) for p in pairs)
        self.max_rank = max(self.ranks, default=0)
        ptrs = [[0 if p is None else p[k].data_ptr() for p in pairs] for k in (0, 1)]
        self.aligned16 = all(v % 16 == 0 for row in ptrs for v in row)
        self.ptr_table: torch.Tensor | None = None
        self.rank_table: torch.Tensor | None = None
        if device is not None:
            self.ptr_table = torch.tensor(ptrs, dtype=torch.int64).reshape(2, -1).to(device)
            self.rank_table = torch.tensor(self.ranks, dtype=torch.int32).to(device)

    @classmethod
    def coerce(cls, factors: Any) -> LoraFactors:
        """``factors`` itself when it already is a LoraFactors, else a new one built from it."""
        return factors if isinstance(factors, cls) else cls(factors)

    def __repr__(self) -> str:
        return (
            f"LoraFactors(ranks={list(self.ranks)}, in={self.in_features}, out={self.out_features}, "
            f"dtype={self.dtype}, device={self.device})"
        )


# ---- the launch --------------------------------------------------------------------------

_lock = threading.Lock()
_modules: dict[int, dict[str, Any]] = {}
_streams: dict[tuple[int, int], Any] = {}


def _functions(device_index: int) -> dict[str, Any]:
    """The kernels on one device: compiled (CuPy caches the binary on disk too) and loaded once."""
    fns = _modules.get(device_index)
    if fns is not None:
        return fns
    import cupy

    with _lock:
        fns = _modules.get(device_index)
        if fns is None:
            with cupy.cuda.Device(device_index):
                try:
                    module = cupy.RawModule(code=kernel_source(), options=compile_options())
                    fns = {name: module.get_function(name) for name in KERNEL_NAMES}
                    for fn in fns.values():
                        _ = fn.kernel  # compile and load now, so that errors surface here
                except Exception as exc:
                    raise KernelError(
                        f"compiling {SOURCE_NAME} for CUDA device {device_index} failed: {exc}"
                    ) from exc
            _modules[device_index] = fns
    return fns


def _stream(device_index: int) -> Any:
    """torch's current stream on the device, as a CuPy ExternalStream (cached per handle)."""
    import cupy

    handle = torch.cuda.current_stream(device_index).cuda_stream
    key = (device_index, handle)
    s = _streams.get(key)
    if s is None:
        try:
            s = cupy.cuda.ExternalStream(handle, device_index)
        except TypeError:  # CuPy without the device_id argument
            s = cupy.cuda.ExternalStream(handle)
        _streams[key] = s
    return s


@functools.cache
def _device_props(device_index: int) -> tuple[int, tuple[int, int]]:
    p = torch.cuda.get_device_properties(device_index)
    return int(p.multi_processor_count), (int(p.major), int(p.minor))


def _meta(name: str, t: Any, dtype: torch.dtype, length: int | None, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name}: must be a torch tensor on {device}", name)
    if t.dtype != dtype or t.dim() != 1 or not t.is_contiguous():
        raise InputError(
            f"{name}: must be a contiguous 1-d {dtype} tensor, got {t.dtype} {tuple(t.shape)}", name
        )
    if t.device != device:
        raise InputError(f"{name}: is on {t.device}, the activations on {device}", name)
    if length is not None and t.numel() != length:
        raise InputError(f"{name}: has {t.numel()} entries, expected {length}", name)
    return t


def _ptr(t: torch.Tensor | None) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


@dataclass(frozen=True)
class Launch:
    """One kernel launch: entry point, grid (x, y), threads per block and the argument values
    (numpy scalars: pointers as uint64, ``long long`` as int64, ``int`` as int32)."""

    kernel: str
    grid: tuple[int, int]
    block: int
    args: tuple[Any, ...]


def _check_activations(x2: torch.Tensor, y2: torch.Tensor) -> None:
    for name, t in (("x2", x2), ("y2", y2)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise InputError(f"{name}: must be a 2-d tensor", name)
        if t.dtype not in DTYPE_SUFFIX:
            raise InputError(f"{name}: dtype {t.dtype} is not float32, float16 or bfloat16", name)
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise InputError(f"{name}: needs unit stride along features, has strides {t.stride()}", name)
    if y2.device != x2.device or y2.dtype != x2.dtype:
        raise InputError(f"y2: {y2.dtype} on {y2.device}, x2 is {x2.dtype} on {x2.device}", "y2")
    if x2.shape[0] != y2.shape[0]:
        raise InputError(f"y2: has {y2.shape[0]} rows, x2 {x2.shape[0]}", "y2")


def _check_metadata(segments: SegmentArrays, n_rows: int, device: torch.device) -> tuple[int, int]:
    """Dtypes, lengths and devices of the metadata (not values: that would synchronise);
    returns (segments, planned tokens)."""
    n_seg = _meta("seg_rank", segments.seg_rank, torch.int32, None, device).numel()
    n_tok = _meta("token_lo", segments.token_lo, torch.int32, None, device).numel()
    _meta("seg_offsets", segments.seg_offsets, torch.int32, n_seg + 1, device)
    _meta("seg_scale", segments.seg_scale, torch.float32, n_seg, device)
    _meta("seg_adapter", segments.seg_adapter, torch.int32, n_seg, device)
    _meta("gate_lo", segments.gate_lo, torch.float32, n_tok, device)
    _meta("gate_hi", segments.gate_hi, torch.float32, n_tok, device)
    if segments.rows is None:
        if n_tok != n_rows:
            raise InputError(f"token_lo: covers {n_tok} tokens, x2 has {n_rows} rows (pass rows=)", "rows")
    else:
        _meta("rows", segments.rows, torch.int32, n_tok, device)
    return n_seg, n_tok


def _check_factors(f: LoraFactors, x2: torch.Tensor, y2: torch.Tensor) -> None:
    if f.device != x2.device or f.dtype != x2.dtype:
        raise InputError(
            f"factors: {f.dtype} on {f.device}, activations {x2.dtype} on {x2.device}", "factors"
        )
    if (f.in_features, f.out_features) != (x2.shape[1], y2.shape[1]):
        raise InputError(
            f"factors: in={f.in_features}, out={f.out_features}; x2/y2 have {x2.shape[1]}, {y2.shape[1]}",
            "factors",
        )


def _input_split(ksplit: int | None, n_tok: int, n_seg: int, in_f: int, sms: int) -> tuple[int, int]:
    """(splits of the input dimension, features per split; a multiple of SHRINK_KC). Default:
    enough blocks for two per multiprocessor, each split >= 2 chunks of the input."""
    if ksplit is None:
        est_tiles = _cdiv(n_tok, TILE_M) + n_seg // 2
        ksplit = max(1, min(_cdiv(2 * sms, est_tiles), _cdiv(in_f, _SHRINK_KC) // 2))
    k_split = _cdiv(_cdiv(in_f, max(int(ksplit), 1)), _SHRINK_KC) * _SHRINK_KC
    return _cdiv(in_f, k_split), k_split


class LaunchTuning(TypedDict, total=False):
    """How :func:`lora_delta_cuda` launches (every key optional).

    ``ksplit``: splits of the input dimension in the shrink (None: enough blocks to fill the
    device); ``mma``: tensor cores for float16/bfloat16 (None: on sm_80+); ``debug_poison``: fill
    the float32 workspace with NaN first (ksplit 1 only), so that a workspace entry the shrink
    failed to write shows up as NaN in ``y2`` (tests).
    """

    ksplit: int | None
    mma: bool | None
    debug_poison: bool


def check_tuning(tuning: Mapping[str, object]) -> None:
    """Refuses a tuning option :class:`LaunchTuning` does not know, naming it."""
    unknown = sorted(set(tuning) - set(LaunchTuning.__annotations__))
    if unknown:
        raise InputError(f"{unknown[0]}: not a launch option (known: ksplit, mma, debug_poison)", unknown[0])


def plan_launches(
    x2: torch.Tensor,
    y2: torch.Tensor,
    factors: LoraFactors | Sequence[tuple[torch.Tensor, torch.Tensor] | None],
    segments: SegmentArrays,
    *,
    sms: int,
    cc: tuple[int, int],
    **tuning: Unpack[LaunchTuning],
) -> tuple[list[Launch], list[torch.Tensor]]:
    """Checks the arguments of :func:`lora_delta_cuda` (shapes, dtypes, devices; not values) and
    returns its launches and the workspaces they use (allocated here, on x2's device; keep them
    alive until the launches ran). ``sms`` and ``cc`` describe the device. No launch at all when
    there is nothing to do. The CPU emulator of the tests runs these same launches."""
    check_tuning(tuning)
    ksplit, mma, debug_poison = tuning.get("ksplit"), tuning.get("mma"), tuning.get("debug_poison", False)
    f = LoraFactors.coerce(factors)
    _check_activations(x2, y2)
    device = x2.device
    n_seg, n_tok = _check_metadata(segments, int(x2.shape[0]), device)
    if f.dtype is None or f.max_rank == 0 or n_seg == 0 or n_tok == 0:
        return [], []
    _check_factors(f, x2, y2)
    assert f.ptr_table is not None and f.rank_table is not None

    suffix = DTYPE_SUFFIX[x2.dtype]
    use_mma = suffix != "f32" and (cc >= (8, 0) if mma is None else bool(mma))
    suffix += "_mma" if use_mma else "_simt"
    in_f, out_f = int(x2.shape[1]), int(y2.shape[1])
    max_tiles = _cdiv(n_tok, TILE_M) + n_seg  # >= the tiles of any segmentation of n_tok tokens
    ksplit, k_split = _input_split(ksplit, n_tok, n_seg, in_f, sms)
    vec_elems = 16 // x2.element_size()
    vec = in_f % vec_elems == 0 and x2.stride(0) % vec_elems == 0 and x2.data_ptr() % 16 == 0 and f.aligned16

    tile_start = torch.empty(n_seg + 1, dtype=torch.int32, device=device)
    if ksplit > 1:
        h = torch.zeros((n_tok, f.max_rank), dtype=torch.float32, device=device)
    elif debug_poison:
        h = torch.full((n_tok, f.max_rank), float("nan"), dtype=torch.float32, device=device)
    else:
        h = torch.empty((n_tok, f.max_rank), dtype=torch.float32, device=device)
    i32, i64 = np.int32, np.int64
    a_ptrs, b_ptrs = f.ptr_table[0], f.ptr_table[1]
    sg, rows = segments, segments.rows
    tile_map = Launch(
        "lora_tile_map",
        (1, 1),
        _MAP_THREADS,
        (_ptr(sg.seg_offsets), _ptr(sg.seg_rank), i32(n_seg), _ptr(tile_start)),
    )
    shrink = Launch(
        f"lora_shrink_{suffix}",
        (max_tiles, ksplit),
        _THREADS,
        (
            _ptr(x2), i64(x2.stride(0)), _ptr(rows), i32(n_tok), i32(in_f),
            _ptr(a_ptrs), _ptr(f.rank_table), i32(f.n_adapters),
            _ptr(sg.seg_offsets), _ptr(sg.seg_rank), _ptr(sg.seg_scale), _ptr(sg.seg_adapter), i32(n_seg),
            _ptr(tile_start), _ptr(sg.token_lo), _ptr(sg.gate_lo), _ptr(sg.gate_hi),
            _ptr(h), i32(f.max_rank), i32(k_split), i32(ksplit > 1), i32(vec),
        ),
    )  # fmt: skip
    expand = Launch(
        f"lora_expand_{suffix}",
        (max_tiles, _cdiv(out_f, _EXPAND_TN)),
        _THREADS,
        (
            _ptr(y2), i64(y2.stride(0)), _ptr(rows), i32(n_tok), i32(out_f),
            _ptr(b_ptrs), _ptr(f.rank_table), i32(f.n_adapters),
            _ptr(sg.seg_offsets), _ptr(sg.seg_rank), _ptr(sg.seg_adapter), i32(n_seg),
            _ptr(tile_start), _ptr(h), i32(f.max_rank),
        ),
    )  # fmt: skip
    return [tile_map, shrink, expand], [tile_start, h, f.ptr_table, f.rank_table]


def lora_delta_cuda(
    x2: torch.Tensor,
    y2: torch.Tensor,
    factors: LoraFactors | Sequence[tuple[torch.Tensor, torch.Tensor] | None],
    segments: SegmentArrays,
    **tuning: Unpack[LaunchTuning],
) -> torch.Tensor:
    """Adds the segmented LoRA delta into ``y2`` in place with the CUDA kernels; returns ``y2``.

    For token t of segment s (adapter a, rank r = min(seg_rank[s], R_a), scale c = seg_scale[s]):
    ``y2[row(t)] += c · B'_a[:, :r] · (g_t ⊙ (A'_a[:r] · x2[row(t)]))`` with
    ``g_t[j] = gate_lo[t] if j < token_lo[t] else gate_hi[t]``; row(t) = ``rows[t]`` or t.

    Args:
        x2: [n_rows, in] activations (float32 / float16 / bfloat16, unit column stride).
        y2: [n_rows, out] output of the same dtype, accumulated into.
        factors: a :class:`LoraFactors` (or what builds one) of that dtype on that device.
        segments: the metadata (:class:`KernelSegments` or :class:`DecodeSegments`, on x2's
            device; see :class:`SegmentArrays` for the arrays and their dtypes).
        tuning: ``ksplit``, ``mma``, ``debug_poison`` (see :class:`LaunchTuning`).

    Everything is launched on torch's current stream, without copies or host synchronisation.
    Metadata values are not checked here (that would synchronise): see
    :func:`chunkwise.kernels.check_segments`. Segments with an adapter id >= n_adapters, or
    offsets past N, are skipped by the kernels rather than read out of bounds.
    """
    if not isinstance(x2, torch.Tensor) or not x2.is_cuda:
        raise InputError("x2: must be a CUDA tensor (the torch path serves the CPU)", "x2")
    index = x2.device.index if x2.device.index is not None else torch.cuda.current_device()
    sms, cc = _device_props(index)
    launches, keep = plan_launches(x2, y2, factors, segments, sms=sms, cc=cc, **tuning)
    if not launches:
        return y2
    fns = _functions(index)
    import cupy

    with cupy.cuda.Device(index):
        stream = _stream(index)
        for launch in launches:
            fns[launch.kernel](launch.grid, (launch.block,), launch.args, stream=stream)
    del keep  # the caching allocator reuses the workspaces only after this stream's work
    return y2


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
