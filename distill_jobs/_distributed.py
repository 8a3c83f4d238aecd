"""The job under ``torchrun`` / ``accelerate launch``: every rank trains, rank 0 does the rest.

Each rank runs the same command. Rank 0 takes the job lock, relabels, picks the run folder,
builds the dataset and writes every file; the other ranks read the run's ``dataset.jsonl`` (so
``work_dir`` must be storage every rank sees, as on one machine or a shared volume), all ranks train
together through ``Trainer`` (DDP), and after training only rank 0 exports, evaluates and
registers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

__all__ = ["Ranks", "ranks_from_env"]


@dataclass(frozen=True)
class Ranks:
    """This process's place in a distributed launch (``rank 0 of 1`` when not launched so)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Whether this process packages and registers (rank 0)."""
        return self.rank == 0

    def _group(self) -> None:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            # rank 0 builds the dataset (facts, embeddings) while the others wait in a barrier
            dist.init_process_group(
                "nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=2)
            )

    def share(self, value: str) -> str:
        """Rank 0's ``value`` on every rank (the run folder, chosen once)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        self._group()
        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0)  # a path string between ranks of one launch
        return str(box[0])

    def wait(self) -> None:
        """Block until every rank gets here (rank 0 has finished what others read)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        self._group()
        dist.barrier()

    def close(self) -> None:
        """Leave the launch's process group, so its native threads stop before the interpreter.

        Without this a rank that finishes first can abort at exit (``terminate called without an
        active exception``) while gloo's threads are still alive.
        """
        if self.world == 1:
            return
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def ranks_from_env() -> Ranks:
    """Read ``RANK`` / ``WORLD_SIZE`` as set by torchrun and accelerate."""
    try:
        return Ranks(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return Ranks()
