"""`chunkwise generate` through its entry point, on a tiny local model folder (random weights,
a word-level tokenizer built here) with and without a PEFT adapter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from chunkwise.cli import main

from tests.support.cli_model import WORDS


def generate(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chunkwise.cli", "generate", *args],
        capture_output=True,
        text=True,
        timeout=300,
        input=stdin,
    )


PROMPT = " ".join(WORDS[i % 40] for i in range(30))


def test_generate_streams_text_and_writes_json(model_dir, tmp_path):
    out_json = tmp_path / "g.json"
    out = generate(
        PROMPT, "--model", str(model_dir), "--max-new-tokens", "12", "--kv", "sinks", "--kv-budget", "12",
        "--prefill-chunk", "8", "--color", "never", "--json", str(out_json),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "new tokens" in out.stdout and "KV cache (sinks)" in out.stdout
    record = json.loads(out_json.read_text())
    assert len(record["new_tokens"]) == 12 and record["prompt_tokens"] == 30
    assert record["kv"]["policy"] == "sinks" and record["kv"]["budget"] == 12
    assert record["kv"]["int8"] is False and record["kv"]["int8_moves"] == 0
    assert record["kv"]["peak_slots"] <= 12 + 32 + 8  # budget + slack + one prefill chunk
    assert all(r == -1 for r in record["ranks"])  # no adapter: base model
    assert record["text"].split()[0] in out.stdout


def test_generate_with_int8_kv_keeps_more_tokens_in_the_same_bytes(model_dir, tmp_path):
    records = []
    for extra in ([], ["--kv-int8"]):
        out_json = tmp_path / f"g{len(extra)}.json"
        out = generate(
            PROMPT, "--model", str(model_dir), "--max-new-tokens", "40", "--kv", "difficulty",
            "--kv-budget", "16", "--prefill-chunk", "8", "--color", "never", "--json", str(out_json), *extra,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        records.append(json.loads(out_json.read_text())["kv"])
    evict, q = records
    assert q["int8"] and q["int8_moves"] > 0 and "moved to int8" in out.stdout
    assert q["budget"] > evict["budget"]  # tokens kept in the bytes of 16 full-precision ones


def test_generate_with_an_adapter_reports_ranks(model_dir, tmp_path):
    out_json = tmp_path / "g.json"
    out = generate(
        "-", "--model", str(model_dir), "--adapter", str(model_dir / "adapter"), "--max-new-tokens", "10",
        "--color", "always", "--json", str(out_json), stdin=PROMPT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "ranks: mean" in out.stdout and "\x1b[48;5;" in out.stdout
    ranks = json.loads(out_json.read_text())["ranks"]
    assert len(ranks) == 10 and set(ranks) <= {0, 4, 8}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--kv", "window"], "budget"),
        (["--kv", "sinks", "--kv-budget", "2"], "budget"),
        (["--max-new-tokens", "0"], "max_new_tokens"),
        (["--target-rank", "4"], "--adapter"),
        (["--adapter", "/nonexistent"], "--adapter"),
        (["--prompt-file", "/nonexistent.txt"], "cannot read"),
    ],
)
def test_bad_generate_arguments_exit_2(model_dir, args, needle, capsys):
    assert main(["generate", "w1 w2 w3", "--model", str(model_dir), *args]) == 2
    assert needle in capsys.readouterr().err


def test_a_folder_without_a_model_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "w1 w2", "--model", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err
