"""Streams: an ordered list of tasks with a scenario, and the label space each step is trained and tested in.

- ``task-il`` (task-incremental): the task id is known at test and gives the label set: each task is scored
  over its own labels.
- ``domain-il`` (domain-incremental): one label space shared by every task (the five tweet domains all say
  negative / neutral / positive); no task id at test. Every task must verbalise the same set of labels.
- ``class-il`` (class-incremental): no task id at test; the label space is the union of every label seen so
  far and grows task after task (old labels keep their ids, ``LabelSpace.extend``).

Cells of the accuracy matrix for a task not yet learnt (``R[i][j]``, ``j > i``, and the untrained row ``b``)
are scored over the labels seen so far plus that task's own labels in class-IL (otherwise its labels are
not candidates at all and every such cell would read 0 by construction); FWT is defined from them.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import MtpeftError
from ..scoring.labels import LabelSpace

SCENARIOS = ("task-il", "domain-il", "class-il")

# Built-in streams: (default scenario, tasks, scenarios it may run in).
STREAMS = {
    "tweets": ("domain-il", ["tweet_airline", "tweet_deflategate", "tweet_selfdriving", "tweet_apple",
                             "tweet_coachella"], ("domain-il", "task-il", "class-il")),
    "mixed": ("task-il", ["bbc_topic", "wordnet_noun", "tweet_airline", "wordnet_verb", "wordnet_pos"],
              ("task-il", "class-il")),
}


def check_scenario(scenario: str) -> str:
    if scenario not in SCENARIOS:
        raise MtpeftError(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
    return scenario


@dataclass
class Stream:
    """``tasks`` in the order they are learnt, and the ``scenario`` they are learnt and tested in."""

    name: str
    tasks: list
    scenario: str

    def __post_init__(self):
        check_scenario(self.scenario)
        self.tasks = list(self.tasks)
        if not self.tasks:
            raise MtpeftError(f"stream {self.name!r} has no task; give at least one")
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise MtpeftError(f"stream {self.name!r} names the task(s) {dup} twice; each task is learnt once")
        if self.scenario == "domain-il":
            first = set(LabelSpace.of(self.tasks[0]).texts)
            for t in self.tasks[1:]:
                if set(LabelSpace.of(t).texts) != first:
                    raise MtpeftError(
                        f"stream {self.name!r} is domain-incremental, but task {t.name!r} has the labels "
                        f"{LabelSpace.of(t).texts} and {self.tasks[0].name!r} has {sorted(first)}: every task of a "
                        "domain-IL stream shares one label space. Use scenario task-il or class-il for this stream")

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def __len__(self) -> int:
        return len(self.tasks)

    def index(self, name: str) -> int:
        return self.names.index(name)

    @property
    def task_id_at_test(self) -> bool:
        return self.scenario == "task-il"

    def train_space(self, step: int) -> LabelSpace | None:
        """The labels step ``step`` trains over: None (each task's own) in task-IL; the shared space in
        domain-IL; the union of the tasks learnt up to and including ``step`` in class-IL."""
        if self.scenario == "task-il":
            return None
        if self.scenario == "domain-il":
            return LabelSpace.union(self.tasks)
        return LabelSpace.union(self.tasks[: step + 1])

    def eval_space(self, step: int, task) -> LabelSpace | None:
        """The labels ``task`` is scored over after step ``step`` (-1: before any training)."""
        if self.scenario == "task-il":
            return None
        if self.scenario == "domain-il":
            return LabelSpace.union(self.tasks)
        return LabelSpace.union(self.tasks[: max(step, -1) + 1]).extend(task)

    def describe(self) -> dict:
        return {"name": self.name, "scenario": self.scenario, "tasks": self.names}


def stream_tasks(name: str) -> tuple[str, list[str]]:
    """A built-in stream's default scenario and task names."""
    if name not in STREAMS:
        raise MtpeftError(f"unknown stream {name!r}; built-in streams: {', '.join(STREAMS)} (or give the tasks "
                          "and the scenario in the config: tasks: [...], scenario: task-il)")
    scenario, tasks, _ = STREAMS[name]
    return scenario, list(tasks)


def load_stream(name: str | None, tasks: Sequence[str] = (), scenario: str | None = None, *,
                max_train: int | None = None, max_eval: int | None = None, seed: int = 0,
                file_options: dict | None = None) -> Stream:
    """A stream from a built-in name or a list of task specs (built-in names or NAME=PATH files), with
    each task's train split capped at ``max_train`` and its validation and test splits at ``max_eval``."""
    from ..suite import load_task

    if name and tasks:
        raise MtpeftError("give either a built-in stream (stream: NAME) or a list of tasks (tasks: [...]), not both")
    if name in STREAMS:
        default, specs = stream_tasks(name)
        allowed = STREAMS[name][2]
        scenario = scenario or default
        if scenario not in allowed:
            raise MtpeftError(f"stream {name!r} runs as {', '.join(allowed)}, not {scenario!r}")
    elif name and not tasks:
        stream_tasks(name)  # raises: unknown stream
    else:
        specs = list(tasks)
        if not specs:
            raise MtpeftError("a continual run needs a stream: stream: tweets | mixed, or tasks: [...] with a "
                              "scenario")
        if scenario is None:
            raise MtpeftError("a stream given as a list of tasks needs its scenario: scenario: task-il, domain-il "
                              "or class-il")
    loaded = []
    for spec in specs:
        t = load_task(spec, seed=seed, **(file_options or {}))
        if max_train is not None:
            t = t.cap(max_train, seed=seed, splits=["train"])
        if max_eval is not None:
            t = t.cap(max_eval, seed=seed, splits=[s for s in ("validation", "test") if s in t.splits])
        loaded.append(t)
    return Stream(name or "custom", loaded, check_scenario(scenario))
