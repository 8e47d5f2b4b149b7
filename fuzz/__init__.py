"""A seeded fuzzer of chunkwise's public API (``make fuzz``; see ``fuzz.driver``)."""
