"""Builds tests/oracles/kernel_emu/emu.cpp (the CPU emulator of segmented_lora.cu) and runs the launches
that :func:`chunkwise.kernels.cuda.plan_launches` plans, on CPU tensors."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path
from typing import Any

import chunkwise.kernels as kernels
import numpy as np
from chunkwise.kernels.cuda import Launch, plan_launches

EMU_CPP = Path(__file__).resolve().parent / "kernel_emu" / "emu.cpp"
#: What plan_launches assumes of the device: an H100's multiprocessors, compute capability 9.0.
SMS, CC = 132, (9, 0)
_CTYPES = {
    np.dtype(np.uint64): ctypes.c_uint64,
    np.dtype(np.int64): ctypes.c_int64,
    np.dtype(np.int32): ctypes.c_int32,
}


class Emulator:
    """The compiled emulator; :meth:`lora_delta` mirrors ``lora_delta_cuda`` on CPU tensors."""

    def __init__(self, build_dir: Path) -> None:
        cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
        if cxx is None:
            raise FileNotFoundError("no C++ compiler (g++, c++ or clang++) on PATH")
        src_dir = Path(kernels.__file__).resolve().parent  # the installed package's .cu
        out = build_dir / "lora_emu.so"
        cmd = [
            cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas",
            "-Wno-unused-function", f"-I{src_dir}", "-DLORA_EMULATE", *kernels.kernel_defines(),
            str(EMU_CPP), "-o", str(out),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building the kernel emulator failed:\n{' '.join(cmd)}\n{proc.stderr}")
        self.warnings = proc.stderr
        self.lib = ctypes.CDLL(str(out))
        self.lib.emu_entry.restype = ctypes.c_void_p
        self.lib.emu_entry.argtypes = [ctypes.c_char_p]
        self.lib.emu_error.restype = ctypes.c_char_p
        self.lib.emu_round.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]

    def run(self, launch: Launch) -> None:
        addr = self.lib.emu_entry(launch.kernel.encode())
        assert addr, f"the emulator has no kernel {launch.kernel}"
        types = [_CTYPES[np.asarray(a).dtype] for a in launch.args]
        fn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, *types)(addr)
        rc = fn(launch.grid[0], launch.grid[1], launch.block, *(int(a) for a in launch.args))
        if rc != 0:
            raise AssertionError(f"{launch.kernel}: {self.lib.emu_error().decode()}")

    def lora_delta(self, x2: Any, y2: Any, factors: Any, segments: Any, **kwargs: Any) -> Any:
        launches, keep = plan_launches(x2, y2, factors, segments, sms=SMS, cc=CC, **kwargs)
        for launch in launches:
            self.run(launch)
        del keep
        return y2
