"""Segmented LoRA kernels (issue 4).

Without a GPU: the source ships in the package and compiles with NVRTC for sm_80 / sm_90 (every
dtype), the float64 reference agrees with a dense per-token oracle over dtypes x ranks x segment
layouts, and the kernels themselves run in a CPU emulator (tests/oracles/kernel_emu/emu.cpp: the real
source, threads as fibers, the tensor-core step rebuilt from the PTX fragment layout) and agree
with the reference. With a GPU (``-m gpu``): the CuPy launches agree with the reference on the
same grid, on a side stream and replayed from a CUDA graph.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import io
import os
import re

import numpy as np
import pytest
import torch
from chunkwise import ConfigError, InputError
from chunkwise import kernels as K
from chunkwise.kernels.cuda import plan_launches

from tests.support.kernel_cases import (
    DELTA_TOL,
    DTYPES,
    LAYOUTS,
    RANKS,
    assert_matches,
    dense_expected,
    make_case,
    numpy_arrays,
)

SINGLE_RANK = ("one_long", "uniform")
MIXED = tuple(lay for lay in LAYOUTS if lay not in SINGLE_RANK)
GRID = [(lay, r) for lay in SINGLE_RANK for r in RANKS] + [(lay, None) for lay in MIXED]
GRID_IDS = [f"{lay}-r{r}" if r is not None else lay for lay, r in GRID]
VARIANTS = {  # kernel variant -> (dtype, mma)
    "f32_simt": (torch.float32, False),
    "f16_simt": (torch.float16, False),
    "f16_mma": (torch.float16, True),
    "bf16_simt": (torch.bfloat16, False),
    "bf16_mma": (torch.bfloat16, True),
}


# ---- packaging and compilation ------------------------------------------------------------


def test_source_ships_in_the_package():
    res = importlib.resources.files("chunkwise.kernels").joinpath("segmented_lora.cu")
    assert res.is_file(), "segmented_lora.cu must be package data of chunkwise.kernels"
    src = K.kernel_source()
    assert "lora_tile_map" in src and "LORA_KERNELS(bf16_mma" in src


def _nvrtc_or_skip():
    try:
        from cuda.bindings import nvrtc

        err, *_ = nvrtc.nvrtcVersion()
    except Exception as exc:  # no cuda-bindings, or the NVRTC library cannot be loaded
        pytest.skip(f"NVRTC is not usable here ({type(exc).__name__}: {exc})")
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        pytest.skip(f"NVRTC is not usable here ({err})")
    if not K.cuda_include_dirs():
        pytest.skip("no cuda_fp16.h found (no CUDA toolkit nor nvidia-cuda-runtime wheel)")


def _entries(ptx: str) -> dict[str, str]:
    """PTX body of every .entry, by name."""
    parts = re.split(r"\.visible \.entry |\.entry ", ptx)[1:]
    return {p[: p.index("(")].strip(): p for p in parts}


@pytest.mark.parametrize("arch", ["compute_90", "compute_80"])
def test_nvrtc_ptx_has_every_kernel_and_mma_only_where_asked(arch):
    _nvrtc_or_skip()
    out = K.nvrtc_compile(arch)
    entries = _entries(out.code.decode(errors="replace"))
    assert set(entries) == set(K.KERNEL_NAMES)
    for name, body in entries.items():
        assert ("mma.sync.aligned.m16n8k16" in body) == name.endswith("_mma"), name


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_nvrtc_cubin_builds_every_dtype(arch):
    """ptxas runs too (CUBIN): register use and spills are in the log (-s shows it)."""
    _nvrtc_or_skip()
    out = K.nvrtc_compile(arch, ptxas_verbose=True)
    assert out.code[:4] == b"\x7fELF"
    for name in K.KERNEL_NAMES:
        assert name.encode() in out.code, name
        assert f"Compiling entry function '{name}' for '{arch}'" in out.log, name
    print(out.log)


def test_nvrtc_leaves_python_constants_alone():
    """NVRTC used to write its (one-byte) log into CPython's interned b" ", after which every
    b" " in the process was NUL and torch.save wrote empty tensors."""
    _nvrtc_or_skip()
    K.nvrtc_compile("compute_80")
    assert bytes([32]) == b" " and b" ".decode() == " "
    buf = io.BytesIO()
    torch.save({"a": torch.ones(4, 32)}, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["a"].shape == (4, 32)


def test_nvrtc_below_sm80_falls_back_to_cuda_cores():
    _nvrtc_or_skip()
    ptx = K.nvrtc_compile("compute_75").code.decode(errors="replace")
    assert set(_entries(ptx)) == set(K.KERNEL_NAMES)
    assert "mma.sync" not in ptx


# ---- the reference against a dense per-token oracle ----------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize(("layout", "rank"), GRID, ids=GRID_IDS)
def test_reference_matches_dense_oracle(layout, rank, dtype):
    case = make_case(layout, dtype, rank=rank, seed=11)
    y0 = case.y2.clone()
    expected = dense_expected(case)
    out = K.lora_delta_reference(case.x2, case.y2, case.factors, case.segments)
    assert out is case.y2
    eps = torch.finfo(dtype).eps
    assert_matches(out, expected, y0, 2 * eps, case.name)
    if rank == 0:  # nothing to add: every row stays bit for bit
        bits = torch.int32 if dtype == torch.float32 else torch.int16
        assert torch.equal(out.view(bits), y0.view(bits))


def test_reference_leaves_unplanned_rows_bit_for_bit():
    case = make_case("padded_rows", torch.float16, seed=3)
    y0 = case.y2.clone()
    K.lora_delta_reference(case.x2, case.y2, case.factors, case.segments)
    pad = torch.isnan(y0).all(dim=1)
    assert pad.sum() == case.y2.shape[0] - len(case.row_of) > 0
    assert torch.isnan(case.y2[pad]).all()


def test_reference_accepts_numpy_metadata_and_validates_it():
    case = make_case("many_short", torch.float32, seed=4)
    kw = numpy_arrays(case.segments)
    host = dataclasses.replace(case.segments, **kw)
    a = K.lora_delta_reference(case.x2, case.y2.clone(), case.factors, host)
    b = K.lora_delta_reference(case.x2, case.y2.clone(), case.factors, case.segments)
    assert torch.equal(a, b)
    bad = dataclasses.replace(host, seg_adapter=np.full_like(kw["seg_adapter"], 7))
    with pytest.raises(InputError) as exc:
        K.lora_delta_reference(case.x2, case.y2.clone(), case.factors, bad)
    assert exc.value.parameter == "seg_adapter"


@pytest.mark.parametrize(
    ("change", "param"),
    [
        (lambda kw: kw.update(seg_offsets=kw["seg_offsets"][::-1].copy()), "seg_offsets"),
        (lambda kw: kw.update(seg_rank=kw["seg_rank"] - 100), "seg_rank"),
        (lambda kw: kw.update(seg_rank=kw["seg_rank"].astype(np.int64)), "seg_rank"),
        (lambda kw: kw.update(gate_lo=np.full_like(kw["gate_lo"], np.nan)), "gate_lo"),
        (lambda kw: kw.update(seg_scale=kw["seg_scale"][:-1]), "seg_scale"),
        (lambda kw: kw.update(rows=np.zeros(len(kw["token_lo"]), np.int32)), "rows"),
    ],
    ids=["decreasing-offsets", "negative-rank", "int64-rank", "nan-gate", "short-scale", "repeated-rows"],
)
def test_check_segments_names_the_bad_array(change, param):
    case = make_case("mixed_adapters", torch.float32, seed=5)
    kw = numpy_arrays(case.segments)
    change(kw)
    with pytest.raises(InputError) as exc:
        K.check_segments(dataclasses.replace(case.segments, **kw), n_adapters=len(case.factors))
    assert exc.value.parameter == param


# ---- metadata builders ------------------------------------------------------------------


def test_segments_from_token_arrays_reproduce_the_plan():
    case = make_case("plan", torch.float32, seed=6)
    seg = K.KernelSegments.from_token_arrays(
        K.TokenArrays(
            case.token_rank,
            case.token_lo,
            case.gate_lo,
            case.gate_hi,
            case.token_scale,
            case.token_adapter,
            np.arange(len(case.token_rank)),
            len(case.token_rank),
        )
    )
    assert seg.rows is None and seg.n_tokens == len(case.token_rank)
    off = seg.seg_offsets.numpy()
    assert np.array_equal(np.repeat(seg.seg_rank.numpy(), np.diff(off)), case.token_rank)
    assert np.array_equal(np.repeat(seg.seg_adapter.numpy(), np.diff(off)), case.token_adapter)
    a = K.lora_delta_reference(case.x2, case.y2.clone(), case.factors, seg)
    b = K.lora_delta_reference(case.x2, case.y2.clone(), case.factors, case.segments)
    assert torch.equal(a, b)


def test_segments_from_plan_take_the_adapter_override():
    import chunkwise as cw

    plan = cw.Scheduler().plan([np.arange(40, dtype=np.int64), np.arange(30, dtype=np.int64)])
    seg = K.KernelSegments.from_plan(plan, adapters=[3, 5])
    seq = np.searchsorted(plan.seq_offsets, plan.seg_offsets[:-1], side="right") - 1
    assert np.array_equal(seg.seg_adapter.numpy(), np.array([3, 5])[seq])
    assert seg.rows is None and seg.n_rows == plan.n_tokens
    with pytest.raises(InputError):
        K.KernelSegments.from_plan(plan, adapters=[1])


def test_decode_segments_write_fixed_buffers():
    dec = K.DecodeSegments(3, adapters=[0, -1, 1], device="cpu")
    bufs = {k: getattr(dec, k).data_ptr() for k in K.SEGMENT_ARRAYS if getattr(dec, k) is not None}

    class Step:
        rank = np.array([4, 64, 0], np.int32)
        lo = np.array([0, 32, 0], np.int32)
        gate_lo = np.array([0.5, 0.25, 1.0], np.float32)
        gate_hi = np.array([0.75, 1.0, 1.0], np.float32)
        scale = np.array([1.0, 0.5, 2.0], np.float32)

    dec.update(Step)
    assert {k: getattr(dec, k).data_ptr() for k in K.SEGMENT_ARRAYS if getattr(dec, k) is not None} == bufs
    assert dec.seg_rank.tolist() == [4, 64, 0] and dec.token_lo.tolist() == [0, 32, 0]
    assert dec.gate_lo.tolist() == [0.5, 0.25, 1.0] and dec.seg_scale.tolist() == [1.0, 0.5, 2.0]
    assert dec.seg_adapter.tolist() == [0, -1, 1] and dec.seg_offsets.tolist() == [0, 1, 2, 3]
    dec.update(Step, adapters=[1, 1, 1])
    assert dec.seg_adapter.tolist() == [1, 1, 1]


# ---- launch planning and the backend switch ------------------------------------------------


def test_plan_launches_grid_and_splits():
    case = make_case("mixed_adapters", torch.bfloat16, in_f=1000, seed=8)
    n, s = case.segments.n_tokens, case.segments.n_segments
    launches, _ = plan_launches(case.x2, case.y2, case.factors, case.segments, sms=132, cc=(9, 0))
    assert [lc.kernel for lc in launches] == ["lora_tile_map", "lora_shrink_bf16_mma", "lora_expand_bf16_mma"]
    assert launches[1].grid[0] == launches[2].grid[0] == -(-n // K.TILE_M) + s
    assert launches[1].grid[1] > 1  # few tiles: the input dimension is split
    assert launches[2].grid[1] == -(-case.y2.shape[1] // 64)
    old, _ = plan_launches(case.x2, case.y2, case.factors, case.segments, sms=132, cc=(7, 5))
    assert old[1].kernel == "lora_shrink_bf16_simt"
    none, _ = plan_launches(case.x2, case.y2, [None, None], case.segments, sms=132, cc=(9, 0))
    assert none == []


def test_plan_launches_checks_shapes_and_dtypes():
    case = make_case("uniform", torch.float16, rank=8, seed=9)
    kw = case.segments
    with pytest.raises(InputError) as exc:
        plan_launches(case.x2.float(), case.y2, case.factors, kw, sms=1, cc=(9, 0))
    assert exc.value.parameter == "y2"
    with pytest.raises(InputError) as exc:
        plan_launches(
            case.x2,
            case.y2,
            case.factors,
            dataclasses.replace(kw, seg_rank=kw.seg_rank.long()),
            sms=1,
            cc=(9, 0),
        )
    assert exc.value.parameter == "seg_rank"
    with pytest.raises(InputError) as exc:
        plan_launches(case.x2[:-1], case.y2[:-1], case.factors, kw, sms=1, cc=(9, 0))
    assert exc.value.parameter == "rows"
    with pytest.raises(InputError) as exc:
        K.LoraFactors([(case.factors[0][0], case.factors[0][1][:, :3])])
    assert exc.value.parameter == "factors"


def test_backend_switch(monkeypatch):
    monkeypatch.setenv(K.ENV_VAR, "torch")
    assert K.kernel_backend() == "torch"
    assert not K.use_cuda_kernels(torch.ones(2))
    monkeypatch.setenv(K.ENV_VAR, "triton")
    with pytest.raises(ConfigError) as exc:
        K.kernel_backend()
    assert exc.value.parameter == K.ENV_VAR
    monkeypatch.setenv(K.ENV_VAR, "auto")
    assert K.kernel_backend() == ("cuda" if K.cuda_kernels_available() else "torch")
    if not K.cuda_kernels_available():
        monkeypatch.setenv(K.ENV_VAR, "cuda")
        with pytest.raises(ConfigError, match="cannot run here"):
            K.kernel_backend()
        with pytest.raises(ConfigError):
            K.use_cuda_kernels(torch.ones(2))


def test_cuda_path_refuses_cpu_tensors():
    case = make_case("uniform", torch.float32, rank=4, seed=10)
    with pytest.raises(InputError) as exc:
        K.lora_delta_cuda(case.x2, case.y2, case.factors, case.segments)
    assert exc.value.parameter == "x2"


# ---- the kernels in the CPU emulator ---------------------------------------------------------


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    from tests.oracles.kernel_emulator import Emulator

    try:
        return Emulator(tmp_path_factory.mktemp("lora_emu"))
    except FileNotFoundError as exc:
        pytest.skip(f"no C++ compiler for the kernel emulator: {exc}")


def test_emulator_rounds_like_torch(emulator):
    x = torch.cat(
        [
            torch.randn(20000, dtype=torch.float64).mul(300).float(),
            torch.tensor([6e-8, 3e-8, 2.9e-8, 65504.0, 65519.0, 65520.0, -1e-5, 0.0, -0.0, 1.0 + 2**-11]),
        ]
    )
    for kind, dtype in ((0, torch.float16), (1, torch.bfloat16)):
        out = torch.empty_like(x)
        emulator.lib.emu_round(x.data_ptr(), out.data_ptr(), x.numel(), kind)
        assert torch.equal(out, x.to(dtype).float()), dtype


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize(("layout", "rank"), GRID, ids=GRID_IDS)
def test_emulated_kernels_match_reference(emulator, layout, rank, variant):
    dtype, mma = VARIANTS[variant]
    case = make_case(layout, dtype, rank=rank, seed=21)
    y0 = case.y2.clone()
    ref = K.lora_delta_reference(case.x2, case.y2.clone(), case.factors, case.segments)
    out = emulator.lora_delta(case.x2, case.y2, case.factors, case.segments, mma=mma, debug_poison=True)
    assert_matches(out, ref, y0, DELTA_TOL[dtype], f"{case.name} {variant}")


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize(
    ("in_f", "out_f", "row_pad", "ksplit"),
    [(100, 37, 0, None), (37, 130, 3, None), (200, 64, 8, 3), (1000, 72, 0, None)],
    ids=["in100-out37", "in37-out130-stride40", "in200-ksplit2", "in1000-auto-split"],
)
def test_emulated_kernels_odd_shapes_strides_and_splits(emulator, variant, in_f, out_f, row_pad, ksplit):
    dtype, mma = VARIANTS[variant]
    case = make_case("mixed_adapters", dtype, in_f=in_f, out_f=out_f, row_pad=row_pad, seed=in_f)
    y0 = case.y2.clone()
    ref = K.lora_delta_reference(case.x2, case.y2.clone(), case.factors, case.segments)
    out = emulator.lora_delta(case.x2, case.y2, case.factors, case.segments, mma=mma, ksplit=ksplit)
    assert_matches(out, ref, y0, DELTA_TOL[dtype], f"{case.name} {variant}")


def test_emulated_decode_step(emulator):
    gen = np.random.default_rng(12)
    b, in_f, out_f = 5, 64, 48
    factors = [(torch.randn(r, in_f) / 8, torch.randn(out_f, r) / 4) for r in (64, 16)]
    dec = K.DecodeSegments(b, adapters=[0, 1, -1, 0, 1], device="cpu")
    for _ in range(3):

        class Step:
            rank = gen.choice([0, 4, 16, 64], b).astype(np.int32)
            lo = (rank // 2).astype(np.int32)
            gate_lo = gen.uniform(0.1, 1, b).astype(np.float32)
            gate_hi = gen.uniform(0.1, 1, b).astype(np.float32)
            scale = gen.uniform(0.5, 1.5, b).astype(np.float32)

        dec.update(Step)
        x2, y2 = torch.randn(b, in_f), torch.randn(b, out_f)
        ref = K.lora_delta_reference(x2, y2.clone(), factors, dec)
        out = emulator.lora_delta(x2, y2.clone(), factors, dec, debug_poison=True)
        assert_matches(out, ref, y2, DELTA_TOL[torch.float32], "decode step")


# ---- on a CUDA device ----------------------------------------------------------------------


def _require_cuda():
    """Skips without CUDA, unless CHUNKWISE_REQUIRE_GPU=1 (benches/gpu_suite.sh): then fails."""
    reason = K.cuda_unavailable_reason()
    if reason is not None:
        if os.environ.get("CHUNKWISE_REQUIRE_GPU") == "1":
            pytest.fail(f"CHUNKWISE_REQUIRE_GPU=1 but no CUDA device: {reason}")
        pytest.skip(f"no CUDA device: {reason}")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize(("layout", "rank"), GRID, ids=GRID_IDS)
def test_cuda_matches_reference(layout, rank, variant):
    _require_cuda()
    dtype, mma = VARIANTS[variant]
    case = make_case(layout, dtype, rank=rank, seed=31).to("cuda")
    y0 = case.y2.clone()
    ref = K.lora_delta_reference(case.x2, case.y2.clone(), case.factors, case.segments)
    for ksplit in (1, None):  # poisoned workspace (stores), then the device's own split (atomics)
        y2 = y0.clone()
        K.lora_delta_cuda(case.x2, y2, case.factors, case.segments, mma=mma, ksplit=ksplit, debug_poison=True)
        torch.cuda.synchronize()
        assert_matches(y2, ref, y0, DELTA_TOL[dtype], f"{case.name} {variant} ksplit={ksplit}")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize(
    ("in_f", "out_f", "ksplit"),
    [(100, 37, None), (37, 130, None), (4096, 4096, None), (4096, 576, 7)],
    ids=["in100-out37", "in37-out130", "4096x4096", "4096x576-ksplit7"],
)
def test_cuda_odd_and_large_shapes(variant, in_f, out_f, ksplit):
    _require_cuda()
    dtype, mma = VARIANTS[variant]
    case = make_case("mixed_adapters", dtype, in_f=in_f, out_f=out_f, row_pad=8, seed=in_f).to("cuda")
    y0 = case.y2.clone()
    ref = K.lora_delta_reference(case.x2, case.y2.clone(), case.factors, case.segments)
    K.lora_delta_cuda(case.x2, case.y2, case.factors, case.segments, mma=mma, ksplit=ksplit)
    torch.cuda.synchronize()
    assert_matches(case.y2, ref, y0, DELTA_TOL[dtype], f"{case.name} {variant}")


@pytest.mark.gpu
def test_cuda_runs_on_torch_current_stream():
    _require_cuda()
    case = make_case("plan", torch.bfloat16, seed=32).to("cuda")
    y0 = case.y2.clone()
    ref = K.lora_delta_reference(case.x2, case.y2.clone(), case.factors, case.segments)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y2 = y0.clone()
        torch.cuda._sleep(10_000_000)  # the launches must queue behind this on the side stream
        K.lora_delta_cuda(case.x2, y2, K.LoraFactors(case.factors), case.segments)
    side.synchronize()
    assert_matches(y2, ref, y0, DELTA_TOL[torch.bfloat16], "side stream")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_cuda_graph_replays_decode_steps_with_new_metadata(dtype):
    _require_cuda()
    gen = np.random.default_rng(33)
    b, in_f, out_f = 8, 576, 576
    factors = K.LoraFactors(
        [
            ((torch.randn(r, in_f) / 24).to("cuda", dtype), (torch.randn(out_f, r) / 8).to("cuda", dtype))
            for r in (64, 32)
        ]
    )
    dec = K.DecodeSegments(b, adapters=[0, 1] * 4, device="cuda")
    x2 = torch.randn(b, in_f, device="cuda", dtype=dtype)
    y_in = torch.randn(b, out_f, device="cuda", dtype=dtype)
    y2 = y_in.clone()

    def step():
        y2.copy_(y_in)
        K.lora_delta_cuda(x2, y2, factors, dec)

    def new_step():
        class Step:
            rank = gen.choice([0, 4, 16, 32, 64], b).astype(np.int32)
            lo = gen.integers(0, 65, b).astype(np.int32)
            gate_lo = gen.uniform(0.1, 1, b).astype(np.float32)
            gate_hi = gen.uniform(0.1, 1, b).astype(np.float32)
            scale = gen.uniform(0.5, 1.5, b).astype(np.float32)

        return Step

    dec.update(new_step())
    step()  # compiles and loads the module before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(4):
        dec.update(new_step())
        x2.copy_(torch.randn(b, in_f, device="cuda", dtype=dtype))
        graph.replay()
        torch.cuda.synchronize()
        ref = K.lora_delta_reference(x2, y_in.clone(), factors, dec)
        assert_matches(y2, ref, y_in, DELTA_TOL[dtype], "graph replay")


@pytest.mark.gpu
def test_cuda_forced_backend_on_a_gpu(monkeypatch):
    _require_cuda()
    monkeypatch.setenv(K.ENV_VAR, "cuda")
    assert K.kernel_backend() == "cuda"
    assert K.use_cuda_kernels(torch.ones(2, device="cuda", dtype=torch.bfloat16))
    assert not K.use_cuda_kernels(torch.ones(2))
