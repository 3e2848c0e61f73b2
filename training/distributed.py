"""Where a run executes: the device (CUDA when asked and present, else the CPU, with a
warning), the process group under `torchrun` (gloo on CPU, nccl on GPU), and the check that
every rank ended with the same weights.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("dsphere.train")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        log.warning("CUDA requested but not available; falling back to CPU")
        return torch.device("cpu")
    return torch.device(name)


def init_distributed(device: torch.device) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size())


def weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_ranks_agree(info: DistInfo, digest: str, out: Path) -> None:
    """All ranks' weight digests must be equal (each also written to out/rank<N>.digest)."""
    digests: list[Any] = [None] * info.world_size
    dist.all_gather_object(digests, digest)
    (out / f"rank{info.rank}.digest").parent.mkdir(parents=True, exist_ok=True)
    (out / f"rank{info.rank}.digest").write_text(digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks ended with different weights: {digests}")
