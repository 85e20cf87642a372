"""Label spaces: stable global label ids over one or several tasks.

A :class:`LabelSpace` is an ordered list of distinct label texts (what a scorer embeds or scores:
each task's ``label_texts``, i.e. its label names through its ``label_template``). Tasks whose labels
verbalise to the same text share one global label: the five tweet tasks all say ``"negative
sentiment"``, ``"neutral sentiment"``, ``"positive sentiment"``, so their union has three labels, not
fifteen. Texts are compared exactly after stripping surrounding whitespace (case matters: ``"Sport"``
and ``"sport"`` are two labels); the first spelling seen is the one kept and scored.

A space is immutable (and hashable): :meth:`LabelSpace.extend` returns a new space whose existing
labels keep their ids and whose new labels are appended, which is how class-incremental learning grows
the space task after task. ``key`` (the tuple of texts) identifies a space for caches.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from ..io import MtpeftError

_SCHEMA = "mtpeft.label_space/1"


def _norm(text: str) -> str:
    return text.strip()


class LabelSpace:
    """Global label ids ``0..len-1``; ``texts[i]`` is what scorers compare against, ``names[i]`` its
    label name (from the task that first brought it)."""

    __slots__ = ("_index", "_names", "_texts")

    def __init__(self, texts: Iterable[str] = (), names: Iterable[str] | None = None):
        texts = list(texts)
        names = list(texts if names is None else names)
        if len(names) != len(texts):
            raise MtpeftError(f"a label space got {len(texts)} label texts but {len(names)} names; give one "
                              "name per text (or no names: the texts are used)")
        index: dict[str, int] = {}
        for i, (t, n) in enumerate(zip(texts, names)):
            _check_text(t, f"label {i}")
            if not isinstance(n, str):
                raise MtpeftError(f"label {i} ({t!r}) has a {type(n).__name__} name {n!r}; names must be strings")
            k = _norm(t)
            if k in index:
                raise MtpeftError(f"the label text {t!r} appears twice in the label space (ids {index[k]} and "
                                  f"{i}); each text is one label: drop the duplicate")
            index[k] = i
        self._texts, self._names, self._index = tuple(texts), tuple(names), index

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def of(cls, task) -> LabelSpace:
        """The space of one task: its labels, in its order (global id == local id)."""
        return cls().extend(task)

    @classmethod
    def union(cls, tasks: Iterable) -> LabelSpace:
        """The labels of ``tasks`` in first-seen order; labels with the same text are one label."""
        return cls().extend(*tasks)

    from_tasks = union

    def extend(self, *tasks) -> LabelSpace:
        """A new space: these labels with the same ids, then the tasks' labels not yet in it, appended."""
        texts, names, seen = list(self._texts), list(self._names), dict(self._index)
        for task in tasks:
            for t, n in zip(_task_texts(task), task.label_names):
                k = _norm(t)
                if k not in seen:
                    seen[k] = len(texts)
                    texts.append(t)
                    names.append(n)
        if len(texts) == len(self._texts):
            return self
        return LabelSpace(texts, names)

    # ---- lookups ---------------------------------------------------------------------------------
    @property
    def texts(self) -> list[str]:
        return list(self._texts)

    @property
    def names(self) -> list[str]:
        return list(self._names)

    @property
    def key(self) -> tuple[str, ...]:
        """Hashable identity for caches: the texts, in id order."""
        return self._texts

    def __len__(self) -> int:
        return len(self._texts)

    def __contains__(self, text) -> bool:
        return isinstance(text, str) and _norm(text) in self._index

    def __eq__(self, other) -> bool:
        return isinstance(other, LabelSpace) and self._texts == other._texts and self._names == other._names

    def __hash__(self) -> int:
        return hash(self._texts)

    def __repr__(self) -> str:
        shown = ", ".join(repr(t) for t in self._texts[:6]) + (", ..." if len(self) > 6 else "")
        return f"LabelSpace({len(self)} labels: {shown})"

    def id_of(self, text: str) -> int:
        """The global id of a label text."""
        i = self._index.get(_norm(text)) if isinstance(text, str) else None
        if i is None:
            raise MtpeftError(f"the label {text!r} is not in the label space ({self!r}); grow the space with "
                              "space.extend(task) for the task that brings it")
        return i

    def ids_of(self, task) -> Tensor:
        """``LongTensor[task.num_labels]``: the global id of each of the task's local labels."""
        ids = []
        for t in _task_texts(task):
            i = self._index.get(_norm(t))
            if i is None:
                raise MtpeftError(f"task {task.name}: its label {t!r} is not in the label space ({self!r}); "
                                  "grow the space with space.extend(task) (ids already given do not change)")
            ids.append(i)
        return torch.tensor(ids, dtype=torch.long)

    def to_global(self, task, local_labels) -> Tensor:
        """The global ids of ``local_labels`` (indices into ``task.label_names``; int, list or tensor)."""
        ids = self.ids_of(task)
        local = torch.as_tensor(local_labels)
        if local.dtype in (torch.bool,) or local.is_floating_point() or local.is_complex():
            raise MtpeftError(f"task {task.name}: local labels must be integers, got dtype {local.dtype}")
        if local.numel() and (int(local.min()) < 0 or int(local.max()) >= len(ids)):
            bad = local[(local < 0) | (local >= len(ids))].flatten()[0]
            raise MtpeftError(f"task {task.name}: local label {int(bad)} is outside 0..{len(ids) - 1} "
                              f"(label names {task.label_names}); fix the labels")
        return ids.to(local.device)[local.long()]

    def candidates_of(self, tasks: Sequence) -> Tensor:
        """``BoolTensor[B, len(self)]``: row ``b`` marks the labels of example ``b``'s task."""
        tasks = list(tasks)
        pos: dict[int, int] = {}
        table = []  # one row per distinct task, then each example picks its task's row
        for t in tasks:
            if id(t) not in pos:
                pos[id(t)] = len(table)
                row = torch.zeros(len(self), dtype=torch.bool)
                row[self.ids_of(t)] = True
                table.append(row)
        if not table:
            return torch.zeros(0, len(self), dtype=torch.bool)
        return torch.stack(table)[torch.tensor([pos[id(t)] for t in tasks])]

    def candidate_mask(self, candidates, batch_size: int) -> Tensor:
        """The candidate set of each example as ``BoolTensor[batch_size, len(self)]``.

        ``candidates``: ``None`` (every label), a bool tensor ``[B, L]`` (or ``[L]``, the same set for every
        example), or one list of global ids per example. Every example needs at least one candidate."""
        L = len(self)
        if candidates is None:
            mask = torch.ones(batch_size, L, dtype=torch.bool)
        elif isinstance(candidates, Tensor):
            if candidates.dtype != torch.bool:
                raise MtpeftError(f"candidates as a tensor must be bool [batch, labels] = [{batch_size}, {L}], got "
                                  f"dtype {candidates.dtype}; pass a mask, or lists of global label ids")
            mask = candidates[None].expand(batch_size, -1) if candidates.dim() == 1 else candidates
            if tuple(mask.shape) != (batch_size, L):
                raise MtpeftError(f"candidates has shape {list(candidates.shape)}, expected [{batch_size}, {L}] "
                                  f"(one row per example, one column per label of the space) or [{L}]")
        else:
            rows = list(candidates)
            if len(rows) != batch_size:
                raise MtpeftError(f"candidates holds {len(rows)} lists of label ids for {batch_size} examples; "
                                  "give one list per example")
            mask = torch.zeros(batch_size, L, dtype=torch.bool)
            for b, ids in enumerate(rows):
                ids = torch.as_tensor(list(ids), dtype=torch.long)
                if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= L):
                    raise MtpeftError(f"candidates of example {b} hold the label id {int(ids[(ids < 0) | (ids >= L)][0])}"
                                      f", outside 0..{L - 1}; ids are global ids of the label space")
                mask[b, ids] = True
        empty = (~mask.any(1)).nonzero().flatten()
        if empty.numel():
            raise MtpeftError(f"example {int(empty[0])} has no candidate label; give every example at least one")
        return mask

    # ---- persistence ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"schema": _SCHEMA, "texts": list(self._texts), "names": list(self._names)}

    @classmethod
    def from_dict(cls, d) -> LabelSpace:
        if not isinstance(d, dict) or not isinstance(d.get("texts"), list):
            raise MtpeftError(f"a label space dict holds a list 'texts' (and 'names'), got {type(d).__name__}: "
                              f"{str(d)[:80]}; write it with LabelSpace.to_dict()")
        schema = d.get("schema", _SCHEMA)
        if schema != _SCHEMA:
            raise MtpeftError(f"label space schema {schema!r} is not {_SCHEMA!r}; re-create it with this version")
        names = d.get("names")
        if names is not None and not isinstance(names, list):
            raise MtpeftError(f"a label space's 'names' must be a list, got {type(names).__name__}")
        return cls(d["texts"], names)


def _check_text(t, where: str) -> None:
    if not isinstance(t, str):
        raise MtpeftError(f"{where} has a {type(t).__name__} text {t!r}; label texts must be strings")
    if not t.strip():
        raise MtpeftError(f"{where} has an empty label text {t!r}; give every label a non-empty name "
                          "(and a label_template that keeps it)")


def _task_texts(task) -> list[str]:
    texts = list(task.label_texts)
    seen: dict[str, int] = {}
    for i, t in enumerate(texts):
        _check_text(t, f"task {task.name}: label {i}")
        k = _norm(t)
        if k in seen:
            raise MtpeftError(f"task {task.name}: labels {seen[k]} and {i} both verbalise to {t.strip()!r}, so "
                              "a scorer cannot tell them apart; make the label names (or label_template) distinct")
        seen[k] = i
    return texts
