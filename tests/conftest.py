"""Shared pytest fixtures (markers are registered in pyproject.toml)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Runs a test with one torch thread: the tiny float64 QR/SVDs of these tests are dominated
    by thread hand-offs on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny local model folder with a tokenizer and a PEFT adapter (see tests/support/cli_model.py)."""
    from tests.support.cli_model import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("tiny-llama"))
