"""Fault injection for crash trials: inert unless the environment asks for it.

``MTPEFT_CRASH_AT=N``: the process kills itself with SIGKILL at its Nth crash point (1-based). The crash
points are the two instants of every atomic write (``mtpeft.io``): just before the rename (the temporary
file written and synced) and just after it. ``MTPEFT_TRACE=FILE``: append one line per phase marker
(``phase <what> <module>``) and per crash point (``point <n> <label>``) to FILE, each flushed to disk
before the process goes on, so that a test that killed the process knows where the kill landed.
``MTPEFT_FAIL_RANK=R:N``: the process of global rank R raises ``InjectedFault`` at its Nth training step
(1-based, counted over all its fits), as a rank of a distributed run that fails would.
"""
from __future__ import annotations

import os
import signal

_points = 0  # crash points passed by this process
_steps = 0  # training steps taken by this process (MTPEFT_FAIL_RANK)


class InjectedFault(RuntimeError):
    """The failure ``MTPEFT_FAIL_RANK`` asks for."""


def mark(line: str) -> None:
    """Append ``line`` to the trace file, if one is asked for."""
    trace = os.environ.get("MTPEFT_TRACE")
    if not trace:
        return
    with open(trace, "a", encoding="utf-8") as f:
        f.write(line.replace("\n", " ") + "\n")
        f.flush()
        os.fsync(f.fileno())


def phase(what: str, module: str = "") -> None:
    mark(f"phase {what} {module}".rstrip())


def crash_point(label: str) -> None:
    """One crash point: counted, traced, and the process SIGKILLed here if it is the Nth asked for."""
    global _points
    at = os.environ.get("MTPEFT_CRASH_AT")
    if not at and not os.environ.get("MTPEFT_TRACE"):
        return
    _points += 1
    mark(f"point {_points} {label}")
    if at and at.strip().isdigit() and int(at) == _points:
        os.kill(os.getpid(), signal.SIGKILL)


def step_fault(rank: int) -> None:
    """One training step of global rank ``rank``: raise ``InjectedFault`` if it is the one asked for."""
    global _steps
    want = os.environ.get("MTPEFT_FAIL_RANK")
    if not want:
        return
    _steps += 1
    r, _, n = want.partition(":")
    if r.strip() == str(rank) and n.strip().isdigit() and int(n) == _steps:
        raise InjectedFault(f"injected fault (MTPEFT_FAIL_RANK={want}) at training step {_steps} of rank {rank}")
