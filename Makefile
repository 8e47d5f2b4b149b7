# Developer interface of chunkwise. `make help` lists the targets.
PY ?= python3

.PHONY: help build-dev build test test-rust lint fmt fuzz bench bench-save bench-compare demo ci clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

build-dev:  ## editable install (rebuilds the Rust extension)
	$(PY) -m pip install -e ".[test]"

build:  ## release wheel into target/wheels (abi3, cp311+)
	maturin build --release

test:  ## Python tests, then Rust tests
	$(PY) -m pytest
	cargo test --workspace

test-rust:  ## Rust tests only
	cargo test --workspace

lint:  ## clippy, rustfmt, ruff, mypy, stubtest
	cargo clippy --workspace --all-targets -- -D warnings
	cargo fmt --all -- --check
	ruff check python tests benches scripts fuzz
	ruff format --check python tests benches scripts fuzz
	$(PY) -m mypy
	$(PY) -m mypy.stubtest chunkwise._core

fmt:  ## format Rust and Python
	cargo fmt --all
	ruff format python tests benches scripts fuzz
	ruff check --fix python tests benches scripts fuzz

# The fuzzer: the Rust property tests at FUZZ_CASES cases each, then FUZZ_CALLS seeded calls of
# the public API (each batch in a subprocess); fails on any panic, crash, hang, non-chunkwise
# exception or broken invariant. CI runs a short slice (tests/test_fuzz.py).
FUZZ_CASES ?= 20000
FUZZ_CALLS ?= 1000000
FUZZ_SEED ?= 0
fuzz:  ## fuzz the core (proptest) and the Python API (10^6 calls, ~15 min on 2 cores)
	PROPTEST_CASES=$(FUZZ_CASES) cargo test --release -p chunkwise-core
	$(PY) -m fuzz.driver --calls $(FUZZ_CALLS) --seed $(FUZZ_SEED) --torch

# Saved baselines live in the repo, one folder per machine kind (KIND=rust-pyo3 is CI's kind).
KIND ?= rust-pyo3
BENCH = $(PY) -m pytest benches/ --benchmark-only --benchmark-storage=file://.benchmarks/$(KIND)

bench:  ## run the benchmarks
	$(BENCH)

bench-save:  ## run the benchmarks and save a new baseline under .benchmarks/$(KIND)
	$(BENCH) --benchmark-autosave

bench-compare:  ## run and compare against the latest saved baseline of this machine kind
	$(BENCH) --benchmark-compare

demo:  ## the README's main job
	chunkwise demo

ci:  ## what CI runs
	bash .ci/run

clean:
	cargo clean
	rm -rf build dist .pytest_cache .ruff_cache .hypothesis
