"""The test suite, importable from the repository root (``pythonpath = ["."]`` in pyproject.toml).

``tests.support`` holds helpers (tiny models and adapters, kernel cases, fake downloads, ...) and
``tests.oracles`` the independent references the tests and benchmarks check against (the numpy
scheduler, the KV-cache replay, the CPU emulator of the CUDA kernels). Test modules import them
as ``from tests.support.peft_helpers import tiny_model``, with no path edits.
"""
