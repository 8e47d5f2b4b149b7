"""chunkwise.vllm's rank table (CHUNKWISE_VLLM_RANKS): read exactly, refused by name when
malformed, and the plugin inert without it (vLLM itself runs in scripts/vllm_export_check.py)."""

from __future__ import annotations

import sys

import pytest
from chunkwise import ConfigError
from chunkwise.vllm import RANKS_ENV, SCHEDULER_ENV, ranks_from_env, register


def test_ranks_are_read_by_lora_id(monkeypatch):
    monkeypatch.setenv(RANKS_ENV, '{"4": 2, "5": 0, "12": 64}')
    assert ranks_from_env() == {4: 2, 5: 0, 12: 64}


@pytest.mark.parametrize(
    "raw", ["{", "[1, 2]", '{"a": 2}', '{"1": -1}', '{"1": 2.5}', '{"1": true}', '{"1": "8"}']
)
def test_a_malformed_table_is_refused_by_name(monkeypatch, raw):
    monkeypatch.setenv(RANKS_ENV, raw)
    with pytest.raises(ConfigError, match=RANKS_ENV) as e:
        ranks_from_env()
    assert e.value.parameter == RANKS_ENV
    with pytest.raises(ConfigError):
        register()  # a bad value stops vLLM's start instead of running at full rank


def test_a_bad_scheduler_setting_stops_vllm_before_it_is_touched(monkeypatch):
    monkeypatch.delenv(RANKS_ENV, raising=False)
    monkeypatch.setenv(SCHEDULER_ENV, '{"rungs": [0, 4], "mode": "nonsense"}')
    monkeypatch.setitem(sys.modules, "vllm", None)  # importing vLLM would raise ImportError
    with pytest.raises(ConfigError, match=SCHEDULER_ENV):
        register()


def test_either_setting_turns_the_plugin_on(monkeypatch):
    """With only the scheduler set, register reaches for vLLM (here: blocked, so ImportError)."""
    monkeypatch.delenv(RANKS_ENV, raising=False)
    monkeypatch.setenv(SCHEDULER_ENV, "{}")
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError):
        register()


def test_without_the_table_the_plugin_does_nothing(monkeypatch):
    monkeypatch.delenv(RANKS_ENV, raising=False)
    monkeypatch.delenv(SCHEDULER_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "vllm", None)  # importing vLLM would raise
    assert ranks_from_env() == {}
    register()
