"""`chunkwise eval` on the tiny local model: each mode's perplexity against an independent
computation (PEFT for full, the bare model for base), uniform ranks, SQuAD from a file."""

from __future__ import annotations

import json

import pytest
import torch
from chunkwise.cli import main
from chunkwise.eval.metrics import causal_lm_nll, strided_perplexity
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.support.cli_model import TEXT


def reference_ppl(model_dir, adapter: bool) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter:
        model = PeftModel.from_pretrained(model, model_dir / "adapter").eval()
    ids = AutoTokenizer.from_pretrained(model_dir)(TEXT, return_tensors="pt").input_ids[0][:200]
    return strided_perplexity(causal_lm_nll(lambda x: model(input_ids=x).logits), ids, 64, 32)


def test_eval_ppl_modes_match_independent_references(model_dir, tmp_path, capsys):
    (tmp_path / "t.txt").write_text(TEXT)
    out = tmp_path / "r.json"
    text = str(tmp_path / "t.txt")
    argv = ["eval", "ppl", "--model", str(model_dir), "--adapter", str(model_dir / "adapter"),
            "--modes", "base,full,uniform,adaptive", "--target-rank", "4", "--text", text, "--tokens", "200",
            "--window", "64", "--stride", "32", "--no-progress", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    rows = {r["mode"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"base", "full", "uniform", "adaptive"}
    assert rows["full"]["ppl"] == pytest.approx(reference_ppl(model_dir, adapter=True), rel=1e-5)
    assert rows["base"]["ppl"] == pytest.approx(reference_ppl(model_dir, adapter=False), rel=1e-5)
    assert rows["full"]["mean_rank"] == 8 and rows["base"]["mean_rank"] == 0
    assert 0 < rows["adaptive"]["mean_rank"] < 8
    assert rows["uniform"]["mean_rank"] == max(1, round(rows["adaptive"]["mean_rank"]))
    assert all(r["tokens"] == 199 for r in rows.values())
    assert "mean rank" in capsys.readouterr().out


def test_eval_squad_from_a_file(model_dir, tmp_path, capsys):
    data = {"data": [{"title": "T", "paragraphs": [{"context": "w1 w2 w3 w4 w5", "qas": [
        {"id": str(i), "question": f"w{i} w9", "answers": [{"text": "w2 w3", "answer_start": 3}]}
        for i in range(4)]}]}]}  # fmt: skip
    (tmp_path / "q.json").write_text(json.dumps(data))
    out = tmp_path / "r.json"
    argv = ["eval", "squad", "--model", str(model_dir), "--adapter", str(model_dir / "adapter"),
            "--modes", "full,uniform", "--rank", "4", "--squad-file", str(tmp_path / "q.json"),
            "--no-progress", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    rows = json.loads(out.read_text())
    assert [r["mode"] for r in rows] == ["full", "uniform"]
    for r in rows:
        assert r["questions"] == 4 and 0 <= r["exact_match"] <= r["f1"] <= 100
    assert rows[1]["mean_rank"] == 4


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--modes", "best"], "--modes"),
        (["--modes", "uniform"], "--rank"),
        (["--modes", "full", "--adapter", ""], "adapter"),
        (["--window", "8", "--stride", "8"], "stride"),
        (["--text", "/nonexistent.txt"], "cannot read"),
    ],
)
def test_bad_eval_arguments_exit_2(model_dir, tmp_path, extra, needle, capsys):
    (tmp_path / "t.txt").write_text(TEXT)
    argv = ["eval", "ppl", "--model", str(model_dir), "--text", str(tmp_path / "t.txt"), "--no-progress"]
    if "--adapter" not in extra:
        argv += ["--adapter", str(model_dir / "adapter")]
    else:
        extra = ["--modes", "full"]  # no adapter at all: full needs one
    assert main(argv + extra) == 2
    assert needle in capsys.readouterr().err
