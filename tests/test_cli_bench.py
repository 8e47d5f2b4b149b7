"""`chunkwise bench` on the tiny local model: the table, the JSON, the PNG, top rung = PEFT."""

from __future__ import annotations

import json

import pytest
from chunkwise.cli import main


@pytest.mark.parametrize("with_adapter", [True, False])
def test_bench_writes_table_json_and_plot(model_dir, tmp_path, capsys, with_adapter):
    argv = ["bench", "--model", str(model_dir), "--tokens", "32", "--rounds", "2", "--random-rank", "4",
            "--png", str(tmp_path / "b.png"), "--json", str(tmp_path / "b.json")]  # fmt: skip
    if with_adapter:
        argv += ["--adapter", str(model_dir / "adapter")]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    for name in ("base", "merged", "peft", "chunkwise"):
        assert name in out
    record = json.loads((tmp_path / "b.json").read_text())
    assert set(record["variants"]) == {"base", "merged", "peft", "chunkwise"}
    assert all(v["ms"] > 0 for v in record["variants"].values())
    assert record["top_rung_rel_err"] < 1e-5
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_bad_sizes(model_dir, capsys):
    assert main(["bench", "--model", str(model_dir), "--tokens", "0"]) == 2
    assert "--tokens" in capsys.readouterr().err
