"""--raptr-verify-sync: a disagreement between ranks is an error on every rank, not a hang."""

from megatron_raptr.sampler import Path
from tests.distributed import run_distributed


def _verify_each(cases):
    """For each case (the active layers of rank 0 and rank 1): the error message, or None."""
    import torch.distributed as dist

    from megatron_raptr.sync import verify_path_sync
    from megatron_raptr.training.initialize import initialize_distributed

    initialize_distributed(1, 1)
    messages = []
    for active_by_rank in cases:
        active = active_by_rank[dist.get_rank()]
        try:
            verify_path_sync(Path(7, 0, active, {layer: 1.0 for layer in active}), device="cpu")
            messages.append(None)
        except RuntimeError as error:
            messages.append(str(error))
    return messages


def test_disagreeing_ranks_all_raise_naming_the_ranks():
    agree, disagree, agree_again = zip(*run_distributed(_verify_each, 2, [
        [(1, 2, 4), (1, 2, 4)],
        [(1, 2, 4), (1, 3, 4)],
        [(1, 4), (1, 4)],
    ]))
    assert agree == agree_again == (None, None)
    assert disagree[0] == disagree[1]
    assert "iteration 7" in disagree[0] and "ranks [0]" in disagree[0] and "ranks [1]" in disagree[0]


def test_checksum_covers_the_iteration():
    assert Path(0, 0, (1, 2), {}).checksum() != Path(1, 0, (1, 2), {}).checksum()
