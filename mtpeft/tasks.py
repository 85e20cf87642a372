"""Tasks: a name, `datasets` splits with `text` and `label`, the label names and how to verbalise them.

A :class:`Task` comes from the built-in suite (:mod:`mtpeft.suite`) or from a user's CSV, JSONL or
parquet file(s) via :func:`load_task_file`. A :class:`TaskStream` is an ordered list of tasks.
"""
from __future__ import annotations

import codecs
import csv
import dataclasses
import io
import json
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, Features, Value

from .io import MtpeftError

SPLITS = ("train", "validation", "test")
FEATURES = Features({"text": Value("string"), "label": Value("int64")})

# file extension -> reader kind
_EXTENSIONS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_SPLIT_ALIASES = {
    "train": ("train",),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test",),
}


def make_dataset(texts: Sequence[str], labels: Sequence[int]) -> Dataset:
    """A split with the canonical features: ``text`` (string) and ``label`` (int64)."""
    return Dataset.from_dict({"text": list(texts), "label": [int(x) for x in labels]}, features=FEATURES)


@dataclass(eq=False)
class Task:
    """One classification task.

    ``splits`` holds ``train``, ``validation`` and ``test`` Datasets with columns ``text`` (str) and
    ``label`` (int64 index into ``label_names``). ``template`` formats the input (must contain
    ``{text}``); ``label_template`` verbalises a label name for scoring (must contain ``{label}``);
    ``prompt_suffix`` follows the formatted input in causal-LM rank classification (the prompt is
    ``template(text) + prompt_suffix``, then ``" " + label text``).
    """

    name: str
    splits: DatasetDict
    label_names: list[str]
    template: str = "{text}"
    label_template: str = "{label}"
    prompt_suffix: str = "\nAnswer:"
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise MtpeftError(f"a task needs a non-empty string name, got {self.name!r}")
        self.label_names = [str(n) for n in self.label_names]
        if not isinstance(self.splits, DatasetDict):
            self.splits = DatasetDict(self.splits)
        self._check_templates()

    def _check_templates(self):
        if "{text}" not in self.template:
            raise MtpeftError(f"task {self.name}: template {self.template!r} lacks the placeholder {{text}}; "
                              "add it where the input goes, e.g. 'Classify: {text}'")
        if "{label}" not in self.label_template:
            raise MtpeftError(f"task {self.name}: label_template {self.label_template!r} lacks the placeholder "
                              "{label}; add it where the label name goes, e.g. 'news about {label}'")

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.splits.items())
        return f"Task({self.name!r}, {self.num_labels} labels, {sizes})"

    # ---- formatting --------------------------------------------------------------------------
    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def label_texts(self) -> list[str]:
        """The label names verbalised by ``label_template`` (what the scorer compares against)."""
        return [self.label_template.replace("{label}", n) for n in self.label_names]

    def format_input(self, text: str) -> str:
        return self.template.replace("{text}", text)

    def format_inputs(self, texts: Iterable[str]) -> list[str]:
        return [self.template.replace("{text}", t) for t in texts]

    # ---- statistics --------------------------------------------------------------------------
    def label_counts(self, split: str = "train") -> np.ndarray:
        """How many examples of each label the split holds (length ``num_labels``)."""
        labels = _labels_array(self._split(split))
        return np.bincount(labels, minlength=self.num_labels)[: self.num_labels]

    def majority_label(self) -> int:
        """The most frequent train label (ties go to the lowest index)."""
        return int(np.argmax(self.label_counts("train")))

    def majority_baseline(self, split: str = "test") -> float:
        """Accuracy on ``split`` of always predicting the most frequent *train* label."""
        labels = _labels_array(self._split(split))
        if labels.size == 0:
            return 0.0
        return int(np.count_nonzero(labels == self.majority_label())) / int(labels.size)

    def _split(self, split: str) -> Dataset:
        if split not in self.splits:
            raise MtpeftError(f"task {self.name} has no split {split!r}; it has: {', '.join(self.splits)}")
        return self.splits[split]

    # ---- transforms ----------------------------------------------------------------------------
    def cap(self, max_examples: int | None, seed: int = 0, splits: Sequence[str] | None = None) -> Task:
        """A copy whose every split (or each of ``splits``) holds at most ``max_examples`` examples.

        Longer splits are shuffled with ``seed`` and then cut, so classes stay mixed; the result is
        deterministic for a given seed. ``None`` returns an unchanged copy.
        """
        if max_examples is None:
            return dataclasses.replace(self, splits=DatasetDict(dict(self.splits)), meta=dict(self.meta))
        if isinstance(max_examples, bool) or not isinstance(max_examples, (int, np.integer)) or max_examples < 1:
            raise MtpeftError(f"max_examples must be a positive integer or None, got {max_examples!r}")
        unknown = sorted(set(splits or ()) - set(self.splits))
        if unknown:
            raise MtpeftError(f"task {self.name} has no split(s) {unknown}; it has {sorted(self.splits)}")
        out = {}
        for k, ds in self.splits.items():
            if len(ds) > max_examples and (splits is None or k in splits):
                idx = np.random.default_rng(seed).permutation(len(ds))[: int(max_examples)]
                ds = ds.select(idx)
            out[k] = ds
        return dataclasses.replace(self, splits=DatasetDict(out), meta=dict(self.meta))

    # ---- validation ------------------------------------------------------------------------------
    def validate(self) -> Task:
        """Check the splits, columns, labels and text type; raise :class:`MtpeftError` naming the fix."""
        self._check_templates()
        where = f"task {self.name}"
        if len(self.label_names) < 2:
            raise MtpeftError(f"{where} has {len(self.label_names)} label name(s) {self.label_names}; a "
                              "classification task needs at least two: give every label a name")
        if len(set(self.label_names)) != len(self.label_names):
            dup = sorted({n for n in self.label_names if self.label_names.count(n) > 1})
            raise MtpeftError(f"{where} has duplicate label names {dup}; make the names unique")
        for split in SPLITS:
            if split not in self.splits:
                raise MtpeftError(f"{where} lacks the split {split!r} (it has: {', '.join(self.splits) or 'none'}); "
                                  "every task needs train, validation and test splits")
            ds = self.splits[split]
            for col in ("text", "label"):
                if col not in ds.column_names:
                    raise MtpeftError(f"{where}: split {split} lacks the column {col!r} (columns: "
                                      f"{', '.join(ds.column_names)}); rename your columns to text and label")
            if len(ds) == 0:
                raise MtpeftError(f"{where}: split {split} is empty; give it examples (or cap less)")
            text_col = _column(ds, "text")
            if str(text_col.type) not in ("string", "large_string"):
                raise MtpeftError(f"{where}: split {split} has a text column of type {text_col.type}, not str; "
                                  "convert the inputs to strings")
            if text_col.null_count:
                raise MtpeftError(f"{where}: split {split} has {text_col.null_count} null text(s); "
                                  "drop those rows or fill them in")
            label_col = _column(ds, "label")
            if label_col.null_count:
                raise MtpeftError(f"{where}: split {split} has {label_col.null_count} null label(s); "
                                  "drop those rows or label them")
            labels = _labels_array(ds)
            bad = labels[(labels < 0) | (labels >= self.num_labels)]
            if bad.size:
                raise MtpeftError(f"{where}: split {split} has label {int(bad[0])} outside 0..{self.num_labels - 1} "
                                  f"(label names: {self.label_names}); fix the labels or the label names")
        return self


def _column(ds: Dataset, name: str):
    """The pyarrow column of ``ds`` as seen through any select/shuffle indices."""
    col = ds.data.column(name)
    indices = getattr(ds, "_indices", None)
    if indices is not None:
        col = col.take(indices.column(0))
    return col


def _labels_array(ds: Dataset) -> np.ndarray:
    col = _column(ds, "label")
    try:
        return np.asarray(col.to_numpy(), dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise MtpeftError(f"the label column holds non-integer values ({e}); labels must be int indices") from e


class TaskStream:
    """An ordered list of tasks with unique names; index by position or by name."""

    def __init__(self, tasks: Iterable[Task] = ()):
        self._tasks: list[Task] = []
        for t in tasks:
            self.append(t)

    def append(self, task: Task) -> None:
        if not isinstance(task, Task):
            raise MtpeftError(f"a TaskStream holds Task objects, got {type(task).__name__}")
        if task.name in self.names:
            raise MtpeftError(f"duplicate task name {task.name!r} in the stream; give each task a unique name")
        self._tasks.append(task)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self._tasks]

    def __iter__(self) -> Iterator[Task]:
        return iter(self._tasks)

    def __len__(self) -> int:
        return len(self._tasks)

    def __getitem__(self, key: int | str) -> Task:
        if isinstance(key, str):
            for t in self._tasks:
                if t.name == key:
                    return t
            raise KeyError(f"no task {key!r} in the stream; tasks: {', '.join(self.names)}")
        return self._tasks[key]

    def __contains__(self, key) -> bool:
        return (key in self.names) if isinstance(key, str) else (key in self._tasks)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no task {name!r} in the stream; tasks: {', '.join(self.names)}") from None

    def __repr__(self) -> str:
        return f"TaskStream({self.names})"


# ---- reading user files -------------------------------------------------------------------------
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))  # UTF-32 LE's BOM starts like UTF-16 LE's


def _decode_text(path: Path) -> str:
    """The file's text: UTF-8, or UTF-16/UTF-32 when a byte-order mark says so (as Excel and Windows
    editors save "Unicode text"); anything else gets an error naming the fix."""
    data = path.read_bytes()
    encoding = next((enc for bom, enc in _BOMS if data.startswith(bom)), "utf-8")
    head = data[:4000]
    if encoding == "utf-8" and head.count(0) > len(head) // 4:  # NULs between characters: UTF-16, no BOM
        order = "le" if data[1:2] == b"\0" else "be"
        raise MtpeftError(f"{path} looks like UTF-16 without a byte-order mark (NUL bytes between the characters); "
                          f"re-encode the file as UTF-8, e.g. `iconv -f utf-16{order} -t utf-8 {path.name} > "
                          f"fixed{path.suffix}`")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        if encoding != "utf-8":
            raise MtpeftError(f"{path} starts with a {encoding.upper()} byte-order mark but is not valid "
                              f"{encoding.upper()} (byte {e.start}, line {line}); save it again as UTF-8") from e
        raise MtpeftError(
            f"{path} is not valid UTF-8 (byte 0x{data[e.start]:02x} on line {line} cannot be decoded); re-encode "
            f"the file as UTF-8 from the encoding it was saved in (`file -i {path.name}` may tell it; Windows "
            f"files are often cp1252): `iconv -f cp1252 -t utf-8 {path.name} > fixed{path.suffix}`"
        ) from e


def _read_columns(path: Path, text_column: str, label_column: str) -> tuple[list, list]:
    """Read the text and label columns of one file (any supported format) as Python lists."""
    kind = _EXTENSIONS.get(path.suffix.lower())
    if kind is None:
        raise MtpeftError(f"unsupported task file type {path.suffix or '(no extension)'!r}: {path}; "
                          "use .csv, .tsv, .jsonl/.json (JSON lines) or .parquet")
    if kind in ("csv", "tsv"):
        text = _decode_text(path)
        columns, rows = _read_csv(path, text, kind)
        if not columns:
            raise MtpeftError(f"{path} is empty: it needs a header line with the columns {text_column} and "
                              f"{label_column}, then one example per line")
        _need_columns(path, columns, text_column, label_column)
        texts = [r.get(text_column) for r in rows]
        labels = [r.get(label_column) for r in rows]
    elif kind == "jsonl":
        text = _decode_text(path)
        records = []
        stripped = text.lstrip()
        if stripped.startswith("["):  # a .json file holding one array of objects
            try:
                records = json.loads(text)
            except (json.JSONDecodeError, RecursionError) as e:
                raise MtpeftError(f"{path} is not valid JSON ({e}); write one JSON object per line") from e
        else:
            for i, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except (json.JSONDecodeError, RecursionError) as e:
                    raise MtpeftError(f"{path} line {i} is not valid JSON ({getattr(e, 'msg', e)}); write one JSON object "
                                      "per line (JSON lines)") from e
        for i, r in enumerate(records, 1):
            if not isinstance(r, dict):
                raise MtpeftError(f"{path}: record {i} is a {type(r).__name__}, not an object; write one "
                                  f'object per line like {{"{text_column}": "...", "{label_column}": "..."}}')
        columns = list(dict.fromkeys(k for r in records for k in r))
        if records:
            _need_columns(path, columns, text_column, label_column)
        texts = [r.get(text_column) for r in records]
        labels = [r.get(label_column) for r in records]
    else:
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for damaged files
            raise MtpeftError(f"{path} is not a readable parquet file ({e}); re-export it") from e
        _need_columns(path, table.column_names, text_column, label_column)
        texts = table.column(text_column).to_pylist()
        labels = table.column(label_column).to_pylist()
    if not texts:
        raise MtpeftError(f"{path} holds no examples; add rows with the columns {text_column} and {label_column}")
    for i, t in enumerate(texts, 1):
        if isinstance(t, bytes):
            try:
                texts[i - 1] = t = t.decode("utf-8")
            except UnicodeDecodeError as e:
                raise MtpeftError(f"{path}: the text in row {i} is not valid UTF-8; re-encode the file's "
                                  "text as UTF-8") from e
        if t is None or (isinstance(t, str) and not t.strip()):
            raise MtpeftError(f"{path}: row {i} has a null or empty {text_column!r}; drop that row or fill "
                              "in its text")
        if not isinstance(t, str):
            raise MtpeftError(f"{path}: row {i} has a {type(t).__name__} in {text_column!r} ({t!r}), not text; "
                              "store the inputs as strings")
        _check_unicode(path, i, text_column, t)
    for i, v in enumerate(labels, 1):
        if isinstance(v, str):
            _check_unicode(path, i, label_column, v)
    return texts, labels


def _check_unicode(path: Path, row: int, column: str, value: str) -> None:
    """JSON's escapes can write half a UTF-16 pair (``"\\ud800"``): no tokenizer or Arrow column takes it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise MtpeftError(f"{path}: row {row} has a lone surrogate ({value[e.start]!r}) in {column!r}, half of an "
                          "escaped UTF-16 pair; fix the escape (or drop the row)") from e


def _read_csv(path: Path, text: str, kind: str) -> tuple[list, list]:
    """Header and rows of a CSV/TSV text. A field may be as long as the file (the csv module's default
    limit, 131072 characters, would refuse a long document: raised for this read, then restored)."""
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if kind == "tsv" else ",")
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text) + 1))
    try:
        columns = list(reader.fieldnames or [])
        rows = list(reader) if columns else []
    except csv.Error as e:
        raise MtpeftError(f"{path} is not a valid {kind.upper()} file: line {reader.line_num}: {e}; check the quotes "
                          "on that line: a field that opens a quote must close it, and a quote inside a quoted "
                          'field is written twice ("")') from e
    finally:
        csv.field_size_limit(limit)
    return columns, rows


def _need_columns(path: Path, columns: Sequence[str], text_column: str, label_column: str) -> None:
    missing = [c for c in (text_column, label_column) if c not in columns]
    if missing:
        raise MtpeftError(
            f"{path} lacks the column(s) {', '.join(repr(c) for c in missing)}; columns found: "
            f"{', '.join(repr(c) for c in columns) or 'none'}. Rename them to {text_column} and {label_column}, "
            "or name yours: --text-column NAME --label-column NAME (text_column=, label_column= in Python)"
        )


_INT_RE = re.compile(r"^\s*[+-]?\d+\s*$")


def _label_kind(path: Path, labels: list) -> str:
    """'int' when every label is an integer (or an integer written as text in a CSV), else 'str'."""
    kinds = set()
    for i, v in enumerate(labels, 1):
        if v is None or (isinstance(v, str) and not v.strip()) or (isinstance(v, float) and math.isnan(v)):
            raise MtpeftError(f"{path}: row {i} has no label; drop that row or label it")
        if isinstance(v, bool):
            raise MtpeftError(f"{path}: row {i} has the boolean label {v!r}; use label names or integer indices")
        if isinstance(v, (int, np.integer)) or (isinstance(v, float) and v.is_integer()):
            kinds.add("int")
        elif isinstance(v, str):
            kinds.add("intstr" if _INT_RE.match(v) else "str")
        else:
            raise MtpeftError(f"{path}: row {i} has a label of type {type(v).__name__} ({v!r}); use a label name "
                              "(string) or an integer index")
    if kinds == {"int", "str"} or kinds == {"int", "str", "intstr"}:
        raise MtpeftError(f"{path} mixes integer and string labels; use one kind throughout")
    return "str" if "str" in kinds else "int"


DEFAULT_MAX_LABELS = 1000


def _shown(names: Sequence[str], k: int = 10) -> str:
    """A list of label names for a message, cut after ``k``."""
    return str(list(names[:k]))[:-1] + (f", ... ({len(names)} in all)]" if len(names) > k else "]")


def _as_int(v) -> int:
    return int(v.strip()) if isinstance(v, str) else int(v)


def _check_count(files: dict, n: int, max_labels: int, what: str) -> None:
    if n > max_labels:
        src = ", ".join(str(p) for p, _ in files.values())
        raise MtpeftError(f"{src}: {n} {what}, more than the bound of {max_labels} labels per task; a label column "
                          "with this many values is often an id or a text column (check --label-column). If these "
                          f"are {n} classes, raise the bound: --max-labels {n} (max_labels={n} in Python)")


def _map_labels(files: dict[str, tuple[Path, list]], label_names: list[str] | None,
                max_labels: int = DEFAULT_MAX_LABELS) -> tuple[list[str], dict]:
    """Turn raw labels of every file into int indices; infer label names when not given.

    Integer labels without label names: the classes are their distinct values in numeric order, named by
    the value (``{0, 1, 10000000}`` is three classes "0", "1", "10000000"; ``0..K-1`` keeps its indices).
    With label names, integers are indices into them. At most ``max_labels`` labels, counted before any
    per-label work."""
    kinds = {split: _label_kind(p, labels) for split, (p, labels) in files.items()}
    given = None if label_names is None else [str(n) for n in label_names]
    if given is not None:
        _check_count(files, len(given), max_labels, "label names given")
        if len(set(given)) != len(given):
            dup = sorted({n for n in given if given.count(n) > 1})
            raise MtpeftError(f"the label names have duplicates {_shown(dup)}; make them unique "
                              "(--label-names / label_names=)")
    # CSV integers written as text: names if they are all among the given names, else indices.
    use_names = {}
    for split, (p, labels) in files.items():
        if kinds[split] == "str":
            use_names[split] = True
        elif given is not None and all(isinstance(v, str) for v in labels):
            use_names[split] = all(v in given for v in labels)
        else:
            use_names[split] = False
    if len(set(use_names.values())) > 1:
        raise MtpeftError(f"the files {', '.join(str(p) for p, _ in files.values())} mix label names and "
                          "integer labels; use one kind in all of them")
    by_name = next(iter(use_names.values()))
    values = None  # integer labels without names: value -> class index
    if given is None:
        distinct = {str(v) for _, labels in files.values() for v in labels} if by_name else \
            {_as_int(v) for _, labels in files.values() for v in labels}
        _check_count(files, len(distinct), max_labels, "distinct labels")
        if by_name:
            names = sorted(distinct)
        else:
            values = {v: i for i, v in enumerate(sorted(distinct))}
            names = [str(v) for v in values]
    else:
        names = given
    if len(names) < 2:
        src = ", ".join(str(p) for p, _ in files.values())
        raise MtpeftError(f"{src}: found {len(names)} label(s) {names}; a classification task needs at least two "
                          "labels: check the label column (or name the labels: --label-names A,B / label_names=[...])")
    out = {}
    index = {n: i for i, n in enumerate(names)}
    for split, (p, labels) in files.items():
        if by_name:
            idx = []
            for i, v in enumerate(labels, 1):
                j = index.get(str(v))
                if j is None:
                    raise MtpeftError(f"{p}: row {i} has the label {v!r}, which is not among the label names "
                                      f"{_shown(names)}; fix the label or add it to --label-names (label_names=)")
                idx.append(j)
        elif values is not None:
            idx = [values[_as_int(v)] for v in labels]
        else:
            idx = [_as_int(v) for v in labels]
            for i, j in enumerate(idx, 1):
                if not 0 <= j < len(names):
                    raise MtpeftError(f"{p}: row {i} has the label index {j}, outside 0..{len(names) - 1} for the "
                                      f"label names {_shown(names)}; fix the label or give a name for every index "
                                      "(--label-names / label_names=)")
        out[split] = idx
    return names, out


def _split_indices(n: int, seed: int, fracs: Sequence[float]) -> list[np.ndarray]:
    """Seeded permutation of range(n) cut into len(fracs)+1 parts: the fractions, then the rest first.

    Returns [rest, part_1, ..., part_k]; each fractional part gets at least one example when n allows.
    """
    perm = np.random.default_rng(seed).permutation(n)
    sizes = [max(1, round(n * f)) if f > 0 else 0 for f in fracs]
    parts, start = [], 0
    for s in sizes:
        parts.append(perm[start:start + s])
        start += s
    return [perm[start:]] + parts


def _check_fracs(val_frac: float, test_frac: float) -> None:
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise MtpeftError(f"the validation and test fractions {val_frac} and {test_frac} must be in [0, 1) and sum to "
                          "less than 1; e.g. --val-frac 0.1 --test-frac 0.2 (val_frac=, test_frac= in Python)")


def _find_split_files(directory: Path) -> dict[str, Path]:
    found: dict[str, list[Path]] = {s: [] for s in SPLITS}
    for p in sorted(directory.iterdir()):
        if not p.is_file() or p.suffix.lower() not in _EXTENSIONS:
            continue
        for split, aliases in _SPLIT_ALIASES.items():
            if p.stem.lower() in aliases:
                found[split].append(p)
    for split, paths in found.items():
        if len(paths) > 1:
            raise MtpeftError(f"{directory} has several {split} files ({', '.join(p.name for p in paths)}); "
                              "keep one per split")
    if not found["train"]:
        listing = ", ".join(sorted(p.name for p in directory.iterdir())) or "nothing"
        raise MtpeftError(f"{directory} has no train file (found: {listing}); name the files train.csv "
                          "(or .jsonl/.parquet) and optionally validation.* and test.*")
    return {s: ps[0] for s, ps in found.items() if ps}


def load_task_file(name: str, path: str | Path, label_names: list[str] | None = None, seed: int = 0,
                   val_frac: float = 0.1, test_frac: float = 0.2, text_column: str = "text",
                   label_column: str = "label", template: str = "{text}", label_template: str = "{label}",
                   prompt_suffix: str = "\nAnswer:", max_labels: int = DEFAULT_MAX_LABELS) -> Task:
    """Load a task from a CSV/TSV, JSONL (.jsonl/.json) or parquet file, or from a directory of split files.

    A single file is split train/validation/test by a seeded permutation (``val_frac``, ``test_frac``).
    A directory holds ``train.*`` and optionally ``validation.*`` (also ``valid``/``val``/``dev``) and
    ``test.*``; a missing validation or test split is carved from train. Labels are names (mapped to
    ``label_names``, inferred as the sorted unique names when not given) or integers (indices into
    ``label_names``; without names, each distinct value is a class named by it, in numeric order).
    A task has at most ``max_labels`` labels (default 1000; raise it for tasks with more classes).
    Text files are UTF-8, or UTF-16/32 with a byte-order mark.
    """
    path = Path(path)
    _check_fracs(val_frac, test_frac)
    if isinstance(max_labels, bool) or not isinstance(max_labels, int) or max_labels < 2:
        raise MtpeftError(f"max_labels must be an integer >= 2 (the most labels a task may have), got {max_labels!r}")
    if not path.exists():
        raise MtpeftError(f"task file for {name!r} not found: {path}; give the path of a CSV, JSONL or parquet "
                          "file (or a directory with train/validation/test files)")
    if path.is_dir():
        paths = _find_split_files(path)
    else:
        paths = {"all": path}
    raw = {s: (p, *_read_columns(p, text_column, label_column)) for s, p in paths.items()}
    names, labels = _map_labels({s: (p, lab) for s, (p, _, lab) in raw.items()}, label_names, max_labels)
    texts = {s: t for s, (_, t, _) in raw.items()}

    parts: dict[str, tuple[list, list]] = {}
    if "all" in texts:
        rest, val, test = _split_indices(len(texts["all"]), seed, [val_frac, test_frac])
        for split, idx in (("train", rest), ("validation", val), ("test", test)):
            parts[split] = ([texts["all"][i] for i in idx], [labels["all"][i] for i in idx])
        src = str(path)
    else:
        t, lab = texts["train"], labels["train"]
        carve = [val_frac if "validation" not in texts else 0.0, test_frac if "test" not in texts else 0.0]
        rest, val, test = _split_indices(len(t), seed, carve)
        parts["train"] = ([t[i] for i in rest], [lab[i] for i in rest])
        for split, idx in (("validation", val), ("test", test)):
            if split in texts:
                parts[split] = (texts[split], labels[split])
            else:
                parts[split] = ([t[i] for i in idx], [lab[i] for i in idx])
        src = ", ".join(str(p) for p in paths.values())
    for split, (t, _) in parts.items():
        if not t:
            n = sum(len(v[0]) for v in parts.values())
            raise MtpeftError(f"{src}: the {split} split is empty ({n} examples in all); add examples "
                              f"(at least 3 to split a single file) or change --val-frac/--test-frac (val_frac=/test_frac=)")
    splits = DatasetDict({s: make_dataset(*parts[s]) for s in SPLITS})
    task = Task(name=name, splits=splits, label_names=names, template=template, label_template=label_template,
                prompt_suffix=prompt_suffix, meta={"source": src, "seed": seed})
    return task.validate()
