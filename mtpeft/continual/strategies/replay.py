"""``replay``: ``seqft`` plus experience replay. After each task its training examples are offered to the
replay memory (keyed by frozen-backbone embeddings, bounded, kept by the memory's policy); while a later task
trains, each batch of ``batch_size`` new examples is joined by ``ratio * batch_size`` replayed ones, drawn at
random or nearest to the batch (``retrieval``; see ``replay_data.py``)."""
from __future__ import annotations

import time
from typing import ClassVar

from ...errors import MtpeftError
from ..replay_data import RETRIEVALS, ReplayDataModule
from .base import only, register_strategy
from .seqft import SeqFT


def memory_rows(mem, stream, task, who: str):
    """The memory's examples for replay while ``task`` trains: ``(ids, (texts, labels, positions), old)``,
    ``old`` the stream's tasks the memory holds (other than ``task``), a position ``p`` meaning ``old[p - 1]``
    (position 0 is the new task)."""
    ids = mem.ids
    examples = mem.get(ids)
    unknown = sorted({e.task for e in examples} - set(stream.names))
    if unknown:
        raise MtpeftError(f"{who}: the memory holds examples of task(s) {unknown}, not in this stream; use a "
                          "new run directory for a different stream")
    held = {e.task for e in examples}
    old = [t for t in stream.tasks if t.name in held and t.name != task.name]
    pos = {t.name: i + 1 for i, t in enumerate(old)}
    return ids, ([e.text for e in examples], [e.label for e in examples], [pos[e.task] for e in examples]), old


@register_strategy("replay")
class Replay(SeqFT):
    uses_memory = True
    local_adapt_ok = True
    defaults: ClassVar[dict] = {"ratio": 0.5, "retrieval": "random"}

    def check_options(self):
        r = self.options["ratio"]
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 8:
            raise MtpeftError(f"replay: ratio (replayed examples per new example in a batch) must be in (0, 8], "
                              f"got {r!r}; e.g. ratio: 0.5")
        if self.options["retrieval"] not in RETRIEVALS:
            raise MtpeftError(f"replay: retrieval must be one of {', '.join(RETRIEVALS)}, got "
                              f"{self.options['retrieval']!r}")

    def train_task(self, step, task):
        mem = self.ctx.memory
        if not len(mem):
            return super().train_task(step, task)
        from ...memory import embed_texts
        from ...train import fit_seed

        t0 = time.perf_counter()
        ids, replay, old = memory_rows(mem, self.ctx.stream, task, self.name)
        new_emb = None
        if self.options["retrieval"] == "nearest":
            new_emb = embed_texts(self.ctx.bank, task.format_inputs(task.splits["train"]["text"]))
        bs = self.ctx.train.batch_size
        dm = ReplayDataModule([task, *old], replay, ids, memory=mem, n_old=max(1, round(self.options["ratio"] * bs)),
                              retrieval=self.options["retrieval"], new_embeddings=new_emb, batch_size=bs,
                              seed=fit_seed(self.ctx.seed, self.fit_name(task)))
        self.ctx.timings["memory_s"] = self.ctx.timings.get("memory_s", 0.0) + time.perf_counter() - t0
        return self.fit([task, *old], only(self.module_name()), self.fit_name(task), step, datamodule=dm)

    def after_task(self, step, task):
        remember(self.ctx, task)

    def eval_router(self, step, task):
        """The shared module; with ``local_adapt``, adapted to each input's memory neighbours (MbPA++)."""
        la = self.local_adapt
        if la is None or not len(self.ctx.memory) or (la.final_only and step != len(self.ctx.stream) - 1):
            return super().eval_router(step, task)
        if getattr(self, "_adapted_step", None) != step:
            from ..local_adapt import LocalAdapted

            tasks = {t.name: t for t in self.ctx.stream.tasks}
            self._adapted = LocalAdapted(self.module_name(), self.ctx.memory, tasks, self.local_adapt,
                                         timings=self.ctx.timings)
            self._adapted_step = step
        return self._adapted


def remember(ctx, task) -> None:
    """Offer ``task``'s training examples to the memory, keyed by their frozen-backbone embeddings (timed as
    memory work)."""
    from ...memory import embed_texts

    t0 = time.perf_counter()
    ds = task.splits["train"]
    texts = list(ds["text"])
    emb = embed_texts(ctx.bank, task.format_inputs(texts))
    ctx.memory.add(emb, texts, [int(x) for x in ds["label"]], task.name, task.name)
    ctx.timings["memory_s"] = ctx.timings.get("memory_s", 0.0) + time.perf_counter() - t0
