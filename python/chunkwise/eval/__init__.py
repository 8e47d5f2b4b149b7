"""Measuring: SQuAD / perplexity metrics (:mod:`.metrics`), evaluation of one injected model in
its modes (:mod:`.evaluation`), interleaved timing and peak memory (:mod:`.benchmarking`) and
the plots (:mod:`.plotting`, needs the ``plot`` extra).

Submodules are imported by name: each has its own optional dependencies.
May import: ``chunkwise.generation``, ``chunkwise.nn``, ``chunkwise.kv``,
``chunkwise.schedule``, ``chunkwise.adapters``, ``chunkwise.errors``.
"""
