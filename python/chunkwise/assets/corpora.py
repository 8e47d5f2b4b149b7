"""Evaluation and training text from the ``bigbench==1.0.0`` sdist on PyPI.

Three files of that sdist are used, and only those are ever extracted:

* ``bigbench/benchmark_tasks/paragraph_segmentation/task.json``: 9,000 Wikipedia articles in
  nine languages (1,000 each: de, en, es, fr, it, nl, pl, pt, ru), one per example, as
  ``input`` = one sentence per line and ``target`` = one label per sentence, ``1`` where a
  paragraph ends. :func:`wikipedia_articles` rebuilds the paragraphs.
* ``bigbench/benchmark_tasks/squad_shifts/squaddev_v1.1.json``: the SQuAD v1.1 development set
  (48 Wikipedia articles, 2,067 paragraphs, 10,565 questions). :func:`squad_examples` flattens
  it to one dict per question; :func:`squad_articles` groups the unique paragraphs by article.
* ``bigbench/benchmark_tasks/squad_shifts/new_wiki_v1.0.json``: the ``new_wiki`` shift of
  SQuAD (48 newer Wikipedia articles, 7,936 questions, same format): ``shift="new_wiki"``.
  The other shifts of that task (nyt, reddit, amazon) are deliberately not extracted: the
  project uses only these two for training, tuning and reported figures.

The sdist (358 MB) is fetched with ``python -m pip download --no-deps bigbench==1.0.0`` (pip
prepares its metadata, which runs the sdist's ``setup.py egg_info`` in pip's build isolation)
and kept in the cache; the three files are extracted once next to it, so later calls do no
network or tar work. The cache is ``cache_dir``, else ``$CHUNKWISE_CACHE``, else
``~/.cache/chunkwise`` (see :func:`chunkwise.assets.cache_root`).

:func:`split_by_article` splits items into train / eval with no article on both sides.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import tarfile
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from ..errors import ChunkwiseError, InputError
from .download import atomic_file, cache_root, pip_download

__all__ = [
    "BIGBENCH_REQUIREMENT",
    "BIGBENCH_MEMBERS",
    "SQUAD_SHIFTS",
    "Article",
    "bigbench_files",
    "extract_members",
    "parse_paragraph_segmentation",
    "parse_squad",
    "split_by_article",
    "squad_articles",
    "squad_examples",
    "wikipedia_articles",
]

BIGBENCH_REQUIREMENT = "bigbench==1.0.0"
BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
_BIGBENCH_SDIST_BYTES = 358_249_635  # for the progress bar only
#: short name -> path inside the sdist (below its top-level ``bigbench-1.0.0/`` directory)
BIGBENCH_MEMBERS: dict[str, str] = {
    "paragraph_segmentation": "bigbench/benchmark_tasks/paragraph_segmentation/task.json",
    "squad": "bigbench/benchmark_tasks/squad_shifts/squaddev_v1.1.json",
    "new_wiki": "bigbench/benchmark_tasks/squad_shifts/new_wiki_v1.0.json",
}
#: SQuAD shift name -> key of :data:`BIGBENCH_MEMBERS`
SQUAD_SHIFTS: dict[str, str] = {"squaddev": "squad", "new_wiki": "new_wiki"}
_MAX_MEMBER_BYTES = 256 << 20  # every file is far smaller (48 MB, 8 MB, 7 MB)

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# safe extraction


def _member_relpath(name: str) -> str | None:
    """``name`` below the archive's single top-level directory, or None if the name is absolute,
    has ``..``/``.``/empty components or backslashes (such a name never matches a wanted path)."""
    if not name or name.startswith("/") or "\\" in name:
        return None
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts) or len(parts) < 2:
        return None
    return "/".join(parts[1:])


def extract_members(archive: str | os.PathLike[str], wanted: Mapping[str, Path]) -> dict[str, Path]:
    """Extract from the ``.tar.gz`` ``archive`` only the members whose path below the top-level
    directory is a key of ``wanted``, each to the destination file ``wanted[path]`` (written to
    a temporary name and renamed, so a destination is never partial).

    Safety: member names are never used to build output paths, names that are absolute or
    contain ``..`` never match, and a matching member that is not a regular file (symlink,
    hard link, device, directory) or is larger than 256 MiB is refused with
    :class:`ChunkwiseError`. Reading stops once every wanted member is written. Raises
    :class:`ChunkwiseError` if the archive is unreadable or a wanted member is missing.
    """

    archive = Path(archive)
    remaining = {PurePosixPath(k).as_posix(): Path(v) for k, v in wanted.items()}
    done: dict[str, Path] = {}
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            for info in tar:
                rel = _member_relpath(info.name)
                if rel is None or rel not in remaining:
                    continue
                if not info.isreg():
                    raise ChunkwiseError(
                        f"refusing to extract {info.name!r} from {archive.name}: not a regular file"
                    )
                if info.size > _MAX_MEMBER_BYTES:
                    raise ChunkwiseError(
                        f"refusing to extract {info.name!r} from {archive.name}: {info.size} bytes"
                    )
                src = tar.extractfile(info)
                if src is None:  # pragma: no cover - isreg() members always have data
                    raise ChunkwiseError(f"cannot read {info.name!r} from {archive.name}")
                dest = remaining.pop(rel)
                with src, atomic_file(dest) as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                done[rel] = dest
                if not remaining:
                    break
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise ChunkwiseError(f"corrupt or unreadable archive {archive}: {exc}") from exc
    if remaining:
        raise ChunkwiseError(
            f"archive {archive.name} lacks the expected member(s): {', '.join(sorted(remaining))}"
        )
    return done


# --------------------------------------------------------------------------------------------
# fetching


def bigbench_files(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    keep_sdist: bool = True,
    progress: bool = True,
) -> dict[str, Path]:
    """The bigbench files (keys of :data:`BIGBENCH_MEMBERS`), extracted in the cache.

    Uses the extracted files when present; else extracts them from the cached sdist; else
    downloads the sdist with pip first (``download=False`` raises instead). ``keep_sdist=False``
    deletes the 358 MB sdist after extraction.
    """

    base = cache_root(cache_dir) / "bigbench"
    targets = {key: base / "extracted" / rel for key, rel in BIGBENCH_MEMBERS.items()}
    if all(p.is_file() for p in targets.values()):
        return targets
    sdist = base / BIGBENCH_SDIST
    if not sdist.is_file():
        if not download:
            raise ChunkwiseError(f"{BIGBENCH_SDIST} is not in {base} and download=False")
        import tempfile

        base.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="sdist-", dir=base) as tmp:
            sdist_bytes = _BIGBENCH_SDIST_BYTES
            got = pip_download(
                BIGBENCH_REQUIREMENT, BIGBENCH_SDIST, Path(tmp), expected_bytes=sdist_bytes, progress=progress
            )
            os.replace(got, sdist)
    extract_members(sdist, {BIGBENCH_MEMBERS[key]: path for key, path in targets.items()})
    if not keep_sdist:
        sdist.unlink(missing_ok=True)
    return targets


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise ChunkwiseError(f"cannot read JSON {path}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Wikipedia articles (paragraph_segmentation)


@dataclass(frozen=True)
class Article:
    """One article: ``title`` (a stable key; the paragraph-segmentation task has no titles, so
    there it is the article's first sentence), ``language`` (ISO 639-1) and its paragraphs."""

    title: str
    language: str
    paragraphs: tuple[str, ...]

    @property
    def text(self) -> str:
        """The paragraphs joined by blank lines."""
        return "\n\n".join(self.paragraphs)


_STOPWORDS: dict[str, frozenset[str]] = {
    "en": frozenset("the of and is was to by with as for from that which his are were this".split()),
    "de": frozenset("der die das und ist von den im mit des ein eine wurde auf sich nicht für".split()),
    "es": frozenset("el los las del y es por con una se fue como para su al".split()),
    "fr": frozenset("le les des et est du une dans par pour qui au sur il été".split()),
    "it": frozenset("il di è della del che per nel con sono dei gli alla una da".split()),
    "nl": frozenset("het een van en is op werd zijn met voor die te dat ook bij".split()),
    "pl": frozenset("i w na z się jest do nie oraz że od jako był przez roku".split()),
    "pt": frozenset("o do da em um uma os no na com que é foi pelo dos das".split()),
}
#: The pinned task.json lists its 9,000 articles in blocks of 1,000 per language, in this order.
#: (A stop-word guess agrees on 8,996; the four others are lists / mixed-language pages it misreads.)
_BLOCK_LANGUAGES = ("de", "en", "es", "fr", "it", "nl", "pl", "pt", "ru")
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)
_CYRILLIC = re.compile(r"[\u0400-\u04FF]")


def guess_language(text: str) -> str:
    """ISO 639-1 code of the most likely of the nine task languages (stop-word counts; Cyrillic
    script means Russian). Accurate on whole articles, not meant for short snippets."""
    sample = text[:4000]
    letters = sum(ch.isalpha() for ch in sample)
    if letters and len(_CYRILLIC.findall(sample)) > 0.15 * letters:
        return "ru"
    words = [w.lower() for w in _WORD.findall(sample)]
    scores = {lang: sum(w in stop for w in words) for lang, stop in _STOPWORDS.items()}
    return max(scores, key=lambda lang: scores[lang])


def parse_paragraph_segmentation(task: Mapping[str, Any]) -> list[Article]:
    """Articles from a loaded ``paragraph_segmentation/task.json``: each example's ``input``
    holds one sentence per line (with a trailing newline) and ``target`` one ``0``/``1`` label per
    sentence, ``1`` on the sentence that ends a paragraph; sentences of a paragraph are joined
    with spaces. Raises :class:`InputError` on an example whose labels do not match.

    Languages: the task does not state them. With exactly 9,000 examples (the pinned file) they
    follow its layout, 1,000 per language in the order de, en, es, fr, it, nl, pl, pt, ru;
    otherwise each article's language is guessed from stop words."""
    examples = task.get("examples") if isinstance(task, Mapping) else None
    if not isinstance(examples, list):
        raise InputError("task has no 'examples' list", parameter="task")
    by_block = len(examples) == 1000 * len(_BLOCK_LANGUAGES)
    articles: list[Article] = []
    for i, ex in enumerate(examples):
        text, target = ex.get("input"), ex.get("target")
        if isinstance(target, list) and len(target) == 1:
            target = target[0]
        if not isinstance(text, str) or not isinstance(target, str):
            raise InputError(f"example {i}: 'input' and 'target' must be strings", parameter="task")
        sentences = text.split("\n")
        if sentences and sentences[-1] == "":
            sentences.pop()
        labels = target.split()
        if len(labels) != len(sentences) or any(lab not in ("0", "1") for lab in labels):
            raise InputError(
                f"example {i}: {len(sentences)} sentences but {len(labels)} labels (or a label not 0/1)",
                parameter="task",
            )
        paragraphs: list[str] = []
        current: list[str] = []
        for sentence, label in zip(sentences, labels, strict=True):
            if sentence.strip():
                current.append(sentence.strip())
            if label == "1" and current:
                paragraphs.append(" ".join(current))
                current = []
        if current:
            paragraphs.append(" ".join(current))
        if not paragraphs:
            continue
        title = sentences[0].strip()[:200]
        language = _BLOCK_LANGUAGES[i // 1000] if by_block else guess_language(text)
        articles.append(Article(title=title, language=language, paragraphs=tuple(paragraphs)))
    return articles


@functools.lru_cache(maxsize=4)
def _wikipedia_all(path: str) -> tuple[Article, ...]:
    return tuple(parse_paragraph_segmentation(_load_json(Path(path))))


def wikipedia_articles(
    language: str | None = "en", cache_dir: str | os.PathLike[str] | None = None
) -> list[Article]:
    """Wikipedia articles from bigbench's paragraph-segmentation task, as :class:`Article` s
    (paragraphs restored). ``language`` filters by language (``"en"`` by default: 1,000
    articles); ``None`` returns all 9,000."""
    if language is not None and language not in _BLOCK_LANGUAGES:
        raise InputError(
            f"language must be one of {', '.join(_BLOCK_LANGUAGES)} or None, got {language!r}",
            parameter="language",
        )
    path = bigbench_files(cache_dir)["paragraph_segmentation"]
    articles = _wikipedia_all(str(path))
    return [a for a in articles if language is None or a.language == language]


# --------------------------------------------------------------------------------------------
# SQuAD v1.1 dev


def parse_squad(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One dict per question of a loaded SQuAD v1.1 JSON: ``id``, ``title``, ``context``,
    ``question``, ``answers`` (list of answer texts, as given, duplicates kept) and
    ``answer_starts`` (their character offsets in ``context``)."""
    articles = data.get("data") if isinstance(data, Mapping) else None
    if not isinstance(articles, list):
        raise InputError("SQuAD JSON has no 'data' list", parameter="data")
    out: list[dict[str, Any]] = []
    for art in articles:
        title = art["title"]
        for para in art["paragraphs"]:
            context = para["context"]
            for qa in para["qas"]:
                answers = qa.get("answers", [])
                out.append(
                    {
                        "id": qa.get("id"),
                        "title": title,
                        "context": context,
                        "question": qa["question"],
                        "answers": [a["text"] for a in answers],
                        "answer_starts": [int(a["answer_start"]) for a in answers],
                    }
                )
    return out


@functools.lru_cache(maxsize=4)
def _squad_all(path: str) -> tuple[dict[str, Any], ...]:
    return tuple(parse_squad(_load_json(Path(path))))


def _squad_path(shift: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    if shift not in SQUAD_SHIFTS:
        raise InputError(
            f"shift: unknown SQuAD shift {shift!r}; choose one of {', '.join(SQUAD_SHIFTS)}", "shift"
        )
    return bigbench_files(cache_dir)[SQUAD_SHIFTS[shift]]


def squad_examples(
    cache_dir: str | os.PathLike[str] | None = None, shift: str = "squaddev"
) -> list[dict[str, Any]]:
    """One dict per question (see :func:`parse_squad`) of the SQuAD v1.1 dev set
    (``shift="squaddev"``) or of its ``new_wiki`` shift; fresh dicts on every call, so callers
    may modify them."""
    path = _squad_path(shift, cache_dir)
    return [
        dict(ex, answers=list(ex["answers"]), answer_starts=list(ex["answer_starts"]))
        for ex in _squad_all(str(path))
    ]


def squad_articles(cache_dir: str | os.PathLike[str] | None = None, shift: str = "squaddev") -> list[Article]:
    """The articles of a SQuAD file as :class:`Article` s: unique contexts in order, per title."""
    by_title: dict[str, list[str]] = {}
    for ex in _squad_all(str(_squad_path(shift, cache_dir))):
        paras = by_title.setdefault(ex["title"], [])
        if ex["context"] not in paras:
            paras.append(ex["context"])
    return [Article(title=t, language="en", paragraphs=tuple(p)) for t, p in by_title.items()]


# --------------------------------------------------------------------------------------------
# splitting


def _key_function(key: str | Callable[[Any], Any]) -> Callable[[Any], Any]:
    if callable(key):
        return key
    if not isinstance(key, str):
        raise InputError("key must be a field / attribute name or a callable", parameter="key")

    def get(item: Any) -> Any:
        if isinstance(item, Mapping):
            return item[key]
        return getattr(item, key)

    return get


def split_by_article(
    items: Iterable[T],
    key: str | Callable[[T], Any] = "title",
    eval_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[list[T], list[T]]:
    """Split ``items`` into ``(train, eval)`` so that no article is on both sides.

    ``key`` names the article of an item: a dict key or attribute name (``"title"``), or a
    callable. The distinct articles are ordered by ``sha256(f"{seed}:{article}")`` and the first
    ``round(eval_fraction * n_articles)`` go to eval (at least one and at most ``n - 1`` when
    ``0 < eval_fraction < 1`` and there are two or more articles). Deterministic across runs
    and machines; items keep their input order within each side.
    """
    if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, int | float):
        raise InputError("eval_fraction must be a number in [0, 1]", parameter="eval_fraction")
    if not 0.0 <= float(eval_fraction) <= 1.0:
        raise InputError(f"eval_fraction must be in [0, 1], got {eval_fraction}", parameter="eval_fraction")
    get = _key_function(key)
    items_list: Sequence[T] = list(items)
    keys = [str(get(item)) for item in items_list]
    distinct = sorted(set(keys))
    n = len(distinct)
    n_eval = round(eval_fraction * n)
    if 0.0 < eval_fraction < 1.0 and n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)

    def rank(article: str) -> tuple[bytes, str]:
        return hashlib.sha256(f"{seed}:{article}".encode()).digest(), article

    eval_keys = set(sorted(distinct, key=rank)[:n_eval])
    train = [item for item, k in zip(items_list, keys, strict=True) if k not in eval_keys]
    evals = [item for item, k in zip(items_list, keys, strict=True) if k in eval_keys]
    return train, evals
