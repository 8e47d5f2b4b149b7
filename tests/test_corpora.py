"""chunkwise.assets.corpora: the bigbench files (download, safe extraction, cache), the parsers of
its paragraph-segmentation and SQuAD tasks, and article-level train / eval splits.

Everything here runs without network: downloads are replaced by fakes that build tiny sdists in
tmp_path.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from chunkwise import ChunkwiseError, InputError
from chunkwise.assets import corpora
from chunkwise.assets.corpora import Article, split_by_article

from tests.support.fake_downloads import FakePip, files_under, no_download

#: The languages of the pinned task.json, 1,000 articles each in this order (as documented by
#: ``parse_paragraph_segmentation``).
BLOCK_LANGUAGES = ("de", "en", "es", "fr", "it", "nl", "pl", "pt", "ru")


# --------------------------------------------------------------------------------------------
# tiny task files in the real formats


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


def tiny_squad(prefix: str = "") -> dict:
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
                "title": prefix + "Super_Bowl_50",
                "paragraphs": [
                    para("Denver won Super Bowl 50.", "Who won?", "Denver"),
                    para("It was played in Santa Clara.", "Where?", "Santa Clara"),
                ],
            },
            {
                "title": prefix + "Warsaw",
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
            add(f"{top}/{corpora.BIGBENCH_MEMBERS['new_wiki']}", json.dumps(tiny_squad("Wiki")).encode())
            add(f"{top}/bigbench/benchmark_tasks/squad_shifts/nyt_v1.0.json", b"{}")
    return path


def reg(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


# --------------------------------------------------------------------------------------------
# safe extraction and the cache


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


# --------------------------------------------------------------------------------------------
# parsers


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
    langs = BLOCK_LANGUAGES
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
    for key, data in (("paragraph_segmentation", task), ("squad", squad), ("new_wiki", tiny_squad("Wiki"))):
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

    # the new_wiki shift is its own file, read the same way
    wiki = corpora.squad_examples(tmp_path, shift="new_wiki")
    assert [e["title"] for e in wiki] == ["WikiSuper_Bowl_50", "WikiSuper_Bowl_50", "WikiWarsaw"]
    assert [a.title for a in corpora.squad_articles(tmp_path, shift="new_wiki")] == [
        "WikiSuper_Bowl_50",
        "WikiWarsaw",
    ]
    for bad in ("nyt", "reddit", "amazon_reviews", ""):
        with pytest.raises(InputError, match="unknown SQuAD shift") as info:
            corpora.squad_examples(tmp_path, shift=bad)
        assert info.value.parameter == "shift"


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
