"""One stored example: what replay feeds back to training (text, label id, task, label-space id)."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import MtpeftError


@dataclass(frozen=True)
class Example:
    """``label`` is the example's label id in the label space named ``space`` (the task's own space in
    task-incremental runs, the shared or growing space otherwise); ``task`` names the task it came from."""

    text: str
    label: int
    task: str
    space: str

    def to_json(self) -> list:
        return [self.text, self.label, self.task, self.space]

    @classmethod
    def from_json(cls, obj, where: str) -> Example:
        ok = (isinstance(obj, list) and len(obj) == 4 and isinstance(obj[0], str) and _is_int(obj[1])
              and isinstance(obj[2], str) and isinstance(obj[3], str))
        if not ok:
            raise MtpeftError(f"{where}: an example must be [text, label id, task, label space] (strings and "
                              f"an integer), got {str(obj)[:120]}; restore the file or re-create the memory")
        return cls(obj[0], int(obj[1]), obj[2], obj[3])


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def make_examples(texts, labels, tasks, spaces=None) -> list[Example]:
    """Aligned lists (a single task or space name applies to every example) as checked examples."""
    texts = list(texts)
    n = len(texts)
    labels = [int(x) for x in (labels.tolist() if hasattr(labels, "tolist") else labels)]
    tasks = [tasks] * n if isinstance(tasks, str) else list(tasks)
    spaces = tasks if spaces is None else ([spaces] * n if isinstance(spaces, str) else list(spaces))
    if not (len(labels) == len(tasks) == len(spaces) == n):
        raise MtpeftError(f"memory.add got {n} texts, {len(labels)} labels, {len(tasks)} tasks and {len(spaces)} "
                          "label spaces; give one of each per example (or one task / space name for all)")
    for name, col in (("text", texts), ("task", tasks), ("label space", spaces)):
        bad = next((x for x in col if not isinstance(x, str)), None)
        if bad is not None:
            raise MtpeftError(f"memory.add: every {name} must be a string, got {type(bad).__name__} {bad!r}")
    if any(x < 0 for x in labels):
        raise MtpeftError("memory.add: label ids must be >= 0 (ids in the example's label space)")
    return [Example(*row) for row in zip(texts, labels, tasks, spaces)]
