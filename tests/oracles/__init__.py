"""Independent references that chunkwise is checked against: ``scheduler`` (the numpy reference of
the scheduler core, also benchmarked in ``benches/``), ``kv`` (a cached decode replayed as one
masked full forward) and ``kernel_emulator`` (the CUDA kernels' own source run on the CPU)."""
