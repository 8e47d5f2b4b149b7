"""`chunkwise convert`: a PEFT adapter folder written as a rank ladder that reproduces it, and a
folder that is not an adapter refused."""

from __future__ import annotations

import pytest
import torch
from chunkwise.cli import main


def test_convert_writes_a_ladder_that_reproduces_the_adapter(model_dir, tmp_path, capsys):
    import chunkwise as cw

    assert main(["convert", str(model_dir / "adapter"), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "100.00 %" in out and "modules" in out
    loaded = cw.RankLadder.load(tmp_path)
    direct = cw.RankLadder.from_peft(model_dir / "adapter")
    assert set(loaded.modules) == set(direct.modules)
    for name, m in direct.modules.items():
        torch.testing.assert_close(loaded.modules[name].update(), m.update())
    assert direct.energy(1) < direct.energy(4) < direct.energy(8) == pytest.approx(1.0)


def test_convert_refuses_a_folder_that_is_not_an_adapter(tmp_path, capsys):
    assert main(["convert", str(tmp_path)]) == 2
    assert "adapter_config.json" in capsys.readouterr().err
