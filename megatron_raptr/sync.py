"""Optional cross-rank check that every rank trains the same path (--raptr-verify-sync)."""

from collections import defaultdict

import torch
import torch.distributed as dist

from megatron_raptr.sampler import Path


def verify_path_sync(path: Path, device: torch.device, group=None) -> None:
    """Raises on every rank, naming the ranks, when any rank's path differs.

    An all-gather (not a reduction) so every rank sees every checksum and all of
    them raise together instead of some waiting on the others.
    """
    local = torch.tensor([path.checksum()], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    ranks_by_checksum = defaultdict(list)
    for rank, value in enumerate(gathered):
        ranks_by_checksum[int(value.item())].append(rank)
    if len(ranks_by_checksum) > 1:
        detail = "; ".join(f"ranks {ranks} have checksum {value}" for value, ranks in ranks_by_checksum.items())
        raise RuntimeError(
            f"RaPTr path differs across ranks at iteration {path.iteration}: {detail}. "
            "Every rank must use the same --seed, --raptr-schedule and model layout."
        )
