"""Segmented LoRA kernels: every adapter at every rank in one launch per stage.

For each kernel segment s of a plan (adapter a, rank r = min(seg_rank[s], R_a), scale c) and
each of its tokens t: ``y[t] += c · B'_a[:, :r] · (g_t ⊙ (A'_a[:r] · x[t]))`` with
``g_t[j] = gate_lo[t] if j < token_lo[t] else gate_hi[t]``, reading only the rank prefix of each
adapter's stored factors. ``segmented_lora.cu`` (shipped in this package) holds the kernels;
:func:`lora_delta_cuda` launches them through CuPy on torch tensors, :func:`lora_delta_reference`
is the float64 oracle with the same signature. ``CHUNKWISE_KERNELS=auto|cuda|torch`` picks
the path (:func:`kernel_backend`, :func:`use_cuda_kernels`).
"""

from __future__ import annotations

from .cuda import (
    DTYPE_SUFFIX,
    ENV_VAR,
    KERNEL_CONSTANTS,
    KERNEL_NAMES,
    TILE_M,
    KernelError,
    LaunchTuning,
    LoraFactors,
    NvrtcOutput,
    compile_options,
    cuda_include_dirs,
    cuda_kernels_available,
    cuda_unavailable_reason,
    kernel_backend,
    kernel_defines,
    kernel_source,
    lora_delta_cuda,
    nvrtc_compile,
    use_cuda_kernels,
)
from .reference import lora_delta_reference
from .segments import (
    SEGMENT_ARRAYS,
    DecodeSegments,
    KernelSegments,
    SegmentArrays,
    StepDecisions,
    TokenArrays,
    check_segments,
)

__all__ = [
    "DTYPE_SUFFIX",
    "SEGMENT_ARRAYS",
    "ENV_VAR",
    "KERNEL_CONSTANTS",
    "KERNEL_NAMES",
    "LaunchTuning",
    "TILE_M",
    "DecodeSegments",
    "KernelError",
    "KernelSegments",
    "LoraFactors",
    "NvrtcOutput",
    "SegmentArrays",
    "StepDecisions",
    "TokenArrays",
    "check_segments",
    "compile_options",
    "cuda_include_dirs",
    "cuda_kernels_available",
    "cuda_unavailable_reason",
    "kernel_backend",
    "kernel_defines",
    "kernel_source",
    "lora_delta_cuda",
    "lora_delta_reference",
    "nvrtc_compile",
    "use_cuda_kernels",
]
