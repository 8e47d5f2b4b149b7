"""`chunkwise plan`: a file or stdin, an empty text, the PNG, and a local model's own tokens and
signals."""

from __future__ import annotations

import subprocess
import sys

from chunkwise.cli import main

from tests.support.cli import run_cli
from tests.support.cli_model import TEXT


def test_plan_reads_a_file_and_stdin(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("alpha beta gamma " * 40 + "zeta eta theta iota kappa lambda " * 10)
    out = run_cli("plan", str(f), "--color", "never")
    assert out.returncode == 0, out.stderr
    assert "180 tokens" in out.stdout
    piped = subprocess.run(
        [sys.executable, "-m", "chunkwise.cli", "plan", "-", "--color", "never"],
        input=f.read_text(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert piped.returncode == 0 and "180 tokens" in piped.stdout


def test_empty_text_is_an_error(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("   \n")
    out = run_cli("plan", str(f))
    assert out.returncode == 2 and "no tokens" in out.stderr


def test_plan_writes_a_png(tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text("alpha beta gamma " * 40 + "zeta eta theta iota kappa lambda " * 10)
    png = tmp_path / "plan.png"
    assert main(["plan", str(f), "--color", "never", "--png", str(png)]) == 0
    assert f"plot: {png}" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000


def test_plan_with_a_model_uses_its_tokens_and_signals(model_dir, tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text(TEXT)
    png = tmp_path / "p.png"
    argv = ["plan", str(f), "--model", str(model_dir), "--color", "never", "--png", str(png)]
    argv += ["--rungs", "0", "4", "8"]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "300 tokens" in out and "the model's entropy and surprisal" in out
    assert "[r" in out and png.read_bytes()[:4] == b"\x89PNG"
