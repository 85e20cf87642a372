"""Training on several processes and nodes through Lightning (DDP): the settings, the strategy, who writes.

Every rank runs the same program (SPMD), as under ``torchrun`` or SLURM: Lightning's own launcher starts
the other local ranks of a plain ``mtpeft train --devices N`` by running the same command again with
``LOCAL_RANK`` set; ``torchrun`` and SLURM start them themselves. Every rank builds the same bank (module
init depends only on seed and name, and DDP broadcasts rank zero's weights at each fit's start), trains its
share of each global batch, and only rank zero writes (the bank, the run state, the report).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from .errors import MtpeftError

STRATEGIES = ("auto", "ddp", "fsdp")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")


@dataclass(frozen=True)
class Parallel:
    """Where a fit runs: ``devices`` processes on each of ``num_nodes`` nodes, with ``strategy``
    (``auto``: DDP when there is more than one process), on ``accelerator``."""

    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    accelerator: str = "auto"

    def __post_init__(self):
        for name in ("devices", "num_nodes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise MtpeftError(f"{name} must be a positive integer (processes per node, nodes), got {v!r}")
        if self.strategy not in STRATEGIES:
            raise MtpeftError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.accelerator not in ACCELERATORS:
            raise MtpeftError(f"accelerator must be one of {', '.join(ACCELERATORS)}, got {self.accelerator!r}")
        if self.strategy == "fsdp":
            raise MtpeftError("--strategy fsdp is not supported yet: it shards the trainable weights across "
                              "ranks, and keeping the best validation state and saving the bank need them whole; "
                              "use --strategy ddp (the bank is small and replicated on every rank)")

    def fields(self) -> dict:
        """``devices``, ``num_nodes``, ``strategy``, ``accelerator``: what ``train.TrainConfig`` takes of it."""
        return {"devices": self.devices, "num_nodes": self.num_nodes, "strategy": self.strategy,
                "accelerator": self.accelerator}

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def check_batch(self, batch_size: int, flag: str = "--batch-size") -> int:
        """The per-rank batch: the global ``batch_size`` split evenly over the ranks (an error if it does not)."""
        if batch_size % self.world_size:
            raise MtpeftError(f"{flag} {batch_size} is the global batch (the same as on one process); with "
                              f"{self.world_size} processes ({self.devices} per node x {self.num_nodes} nodes) it "
                              f"must be a multiple of {self.world_size}: each rank takes batch/{self.world_size}. "
                              f"Give e.g. {flag} {-(-batch_size // self.world_size) * self.world_size}")
        return batch_size // self.world_size

    def trainer_kwargs(self, find_unused: bool = True) -> dict:
        """``accelerator``, ``devices``, ``num_nodes``, ``strategy`` and the data settings for ``L.Trainer``.
        ``find_unused``: some trainable parameter may get no gradient in a step on some rank (see below)."""
        kw = {"accelerator": self.accelerator, "devices": self.devices, "num_nodes": self.num_nodes}
        if not self.distributed:
            return {**kw, "strategy": "auto"}
        from lightning.pytorch.strategies import DDPStrategy

        # find_unused_parameters: with several trainable modules a router may leave one out of a batch on
        # one rank (a task absent from its share); DDP then counts its gradient as zero there (the global
        # mean stays right) instead of waiting for it for ever. With one trainable module (an expert, a
        # multitask module) every step uses it, and the extra autograd traversal is skipped.
        # The process group backend follows the accelerator (gloo on CPU, NCCL on GPUs). A rank that dies
        # is noticed by its peers' collectives or by Lightning's launcher; torch's timeout (30 min) bounds
        # the rest.
        strategy = DDPStrategy(find_unused_parameters=find_unused)
        # the data is split by our own rank-aware sampler (the same global order as one process), so
        # Lightning must not put a DistributedSampler in its place
        return {**kw, "strategy": strategy, "use_distributed_sampler": False}


def global_rank(devices: int = 1) -> int:
    """This process's rank before any process group exists, from the launcher's environment: ``RANK``
    (torchrun), else ``NODE_RANK * devices + LOCAL_RANK`` (Lightning's launcher: the first process of
    node k has ``NODE_RANK=k`` from the user and no ``LOCAL_RANK``; on one node neither), else
    ``SLURM_PROCID`` when SLURM started several tasks; 0 for a plain single process."""
    env = os.environ

    def num(key: str) -> int | None:
        v = env.get(key, "").strip()
        return int(v) if v.isdigit() else None

    if num("RANK") is not None:
        return num("RANK")
    if num("LOCAL_RANK") is not None or num("NODE_RANK") is not None:  # node k's first process: NODE_RANK only
        return (num("NODE_RANK") or 0) * int(devices) + (num("LOCAL_RANK") or 0)
    if env.get("SLURM_PROCID", "").strip().isdigit() and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return int(env["SLURM_PROCID"])
    return 0


def all_sum(values: list[int]) -> list[int]:
    """Integer counts summed over every rank (unchanged without a process group)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return [int(v) for v in t.cpu().tolist()]


def eval_shard() -> tuple[int, int] | None:
    """(rank, world size) while a process group spans several ranks (after a distributed fit), else None:
    what a sharded evaluation (``train.evaluate``, ``continual.evaluate.row``) takes as ``shard``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


def _peer_failed(e: BaseException) -> bool:
    """A collective broke because a peer went away (gloo: the connection closed; NCCL: a backend error)."""
    import torch.distributed as dist

    text = str(e)
    return isinstance(e, getattr(dist, "DistBackendError", ())) or "Connection closed by peer" in text \
        or "remote worker" in text


@contextlib.contextmanager
def rank_failure(parallel: Parallel, rank: int, kept: str, command: str, again: str | None = None):
    """On several processes, any failure (of this rank, or a peer's seen as a broken collective) becomes a
    clear error naming the rank, what is ``kept`` (e.g. "The bank OUT") and how to go on (``again``; default:
    ``command`` with --resume); the run's state is left as a kill leaves it (waiting for ``--resume``). One
    process: errors pass unchanged."""
    try:
        yield
    except (MtpeftError, KeyboardInterrupt):
        raise
    except Exception as e:
        if not parallel.distributed:
            raise
        what = f"{type(e).__name__}: {str(e)[:500]}"
        if _peer_failed(e):
            what = f"another rank failed (its own error is printed too): {what[:200]}"
        raise MtpeftError(f"rank {rank} of {parallel.world_size} stopped: {what}; the run stops on every rank. "
                          f"{kept} holds what was finished before; "
                          + (again or f"`{command}` with the same flags and --resume finishes the run (on any number "
                                      "of processes)")) from e
