"""Save and resume training with Megatron-Core distributed checkpoints (torch_dist format).

A --save directory holds one checkpoint directory per saved iteration and a tracker:

    iter_0000100/                       written by all ranks through dist_checkpointing
    latest_checkpointed_iteration.txt   the last complete save, replaced atomically

The tracker is written only after every rank has finished its part (with async_save, in
the save's finalization, once every rank's writer is done), so an interrupted save leaves
the previous checkpoint as the latest one. Every rank writes its own shards; replicated
ones (model weights, the regular optimizer's state) are spread over the DP ranks. Model
states are ShardedTensors in model space, so they load under any TP/PP/DP layout, into a
model built with the checkpoint's padded vocabulary size (saved_padded_vocab_size). RNG
states belong to one (PP rank, TP rank) and are restored only under the saved layout.
"""
import inspect
import os
import random
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing import ShardedObject
from megatron.core.dist_checkpointing.serialization import (
    get_default_load_sharded_strategy,
    get_default_save_sharded_strategy,
)
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelLoadStrategyWrapper,
    FullyParallelSaveStrategyWrapper,
)
from megatron.core.optimizer import DistributedOptimizer, MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.utils import unwrap_model

from megatron_raptr import megatron_internals as internals
from megatron_raptr.compat import torch_adam

TRACKER = "latest_checkpointed_iteration.txt"

# How the distributed optimizer saves its state (Megatron-LM's choice too):
# - 'dp_reshardable' (default): each DP rank writes its own slice of the optimizer's buckets,
#   no communication; it reloads only under the same TP and PP (DP may change).
# - 'fully_reshardable' (--dist-ckpt-optim-fully-reshardable): gathered over DP (over gloo, to
#   DP rank 0 only: the memory-efficient variant) and stored per model parameter, shaped like
#   it, so it reloads under any TP/PP/DP.
# Megatron-Core's per-parameter, per-rank 'fully_sharded_model_space' would be both, but its
# ShardedTensors carry a flattened_range, which 0.16 and 0.19 reject ("not supported"); its
# 'fully_sharded_bucket_space' is gone. Without a prefix per chained sub-optimizer the keys do
# not depend on parameter grouping.
PER_RANK, RESHARDABLE = "dp_reshardable", "fully_reshardable"


class CheckpointMismatch(RuntimeError):
    """A checkpoint this run cannot load; the message names --load and what differs."""


# Megatron-Core 0.19 writes asynchronous saves with NVIDIA Resiliency Extension by default, a
# separate package; its own writer ("mcore") is what 0.16 has.
_ASYNC_STRATEGY = (
    {"async_strategy": "mcore"} if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters else {}
)

_async_saves: Optional[AsyncCallsQueue] = None  # saves being written; created by the first async save


def _optimizer_metadata(sharding_type: str) -> dict:
    return {
        "distrib_optim_sharding_type": sharding_type,
        "distrib_optim_fully_reshardable_mem_efficient": True,
        "chained_optim_avoid_prefix": True,
    }


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def save_checkpoint(
    save_dir: str,
    iteration: int,
    model: List[torch.nn.Module],
    optimizer: MegatronOptimizer,
    opt_param_scheduler: OptimizerParamScheduler,
    state: dict,
    async_save: bool = False,
    fully_parallel: bool = True,
    optim_fully_reshardable: bool = False,
) -> None:
    """Save model, optimizer, LR schedule, RNG states and `state` (small, picklable
    trainer state; rank 0's copy is saved) as iteration `iteration`. Collective.

    async_save: return once the shards are handed to writer processes; the save commits (the
    tracker names it) in finalize_saves(), which the next save calls first. fully_parallel:
    spread replicated shards over the DP ranks (otherwise DP rank 0 writes them all).
    optim_fully_reshardable: the distributed optimizer's state in the format that reloads
    under another TP/PP (gathered over DP), rather than per rank.
    """
    finalize_saves()  # a pending save commits before this one can become the latest
    path = checkpoint_dir(save_dir, iteration)
    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()  # dist_checkpointing.save expects the directory to exist
    sharding_type = RESHARDABLE if optim_fully_reshardable else PER_RANK
    sharded = _sharded_state_dict(model, optimizer, sharding_type, with_rng=True, is_loading=False)
    sharded.update(
        layout=_layout(),
        padded_vocab_size=_padded_vocab_size(model),
        distributed_optimizer=optimizer.config.use_distributed_optimizer,
        distrib_optim_sharding_type=sharding_type,
        optimizer_parts=len(internals.optimizers_of(optimizer)),
        opt_param_scheduler=opt_param_scheduler.state_dict(),
        state=state,
    )
    strategy = get_default_save_sharded_strategy()
    if fully_parallel:
        strategy = FullyParallelSaveStrategyWrapper(strategy, parallel_state.get_data_parallel_group())
    request = dist_checkpointing.save(
        sharded, path, strategy, async_sharded_save=async_save,
        preprocess_common_before_consistancy_check=_comparable, **(_ASYNC_STRATEGY if async_save else {}),
    )
    if not async_save:
        _commit(save_dir, iteration)
        return
    global _async_saves
    _async_saves = _async_saves or AsyncCallsQueue()
    # Finalization runs once every rank's writer is done, after Megatron's metadata.json.
    request.add_finalize_fn(lambda: _commit(save_dir, iteration))
    _async_saves.schedule_async_request(request)


def finalize_saves(blocking: bool = True) -> None:
    """Commit the asynchronous saves whose shards every rank has written; with `blocking`,
    wait for all of them. Collective while a save is pending; nothing to do otherwise."""
    if _async_saves is not None:
        _async_saves.maybe_finalize_async_calls(blocking=blocking)


def _commit(save_dir: str, iteration: int) -> None:
    """Name iteration `iteration` in the tracker, once every rank's shards are on disk."""
    dist.barrier()
    if dist.get_rank() == 0:
        tracker = os.path.join(save_dir, TRACKER)
        with open(tracker + ".tmp", "w") as f:
            f.write(f"{iteration}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tracker + ".tmp", tracker)
    dist.barrier()  # no rank returns (and possibly exits) before the save is committed


def load_checkpoint(
    load_dir: str,
    model: List[torch.nn.Module],
    optimizer: MegatronOptimizer,
    opt_param_scheduler: OptimizerParamScheduler,
    load_rng: bool = True,
    fully_parallel: bool = False,
) -> Optional[dict]:
    """Restore the latest complete checkpoint under `load_dir` into the given (freshly
    built) model, optimizer and scheduler, under any TP/PP/DP layout its format allows
    (check_resumable). Returns the saved `state`, or None when nothing was ever saved
    there. fully_parallel: each replicated shard is read by one DP rank and sent to the
    others. Collective."""
    layout = _layout()
    checked = check_resumable(load_dir, layout["tp"], layout["pp"], optimizer.config.use_distributed_optimizer,
                              layout.get("vp"))
    if checked is None:
        return None
    path, common = checked
    saved_parts, parts = common.get("optimizer_parts"), len(internals.optimizers_of(optimizer))
    if saved_parts is not None and saved_parts != parts:
        # Megatron names a chained optimizer's state per part (chained_0, chained_1), a single one's not.
        raise CheckpointMismatch(
            f"--load {load_dir}: {path} holds the state of {saved_parts} optimizer(s), this run builds {parts}: "
            "Megatron keeps the experts' optimizer apart from the rest's only with expert parallelism "
            "(--expert-model-parallel-size > 1, or an --expert-tensor-parallel-size other than "
            "--tensor-model-parallel-size). Resume on the same side of that line as the run that saved it."
        )
    if torch_adam.needed():
        torch_adam.install()
    saved_vocab = common.get("padded_vocab_size")
    if saved_vocab is not None and saved_vocab != _padded_vocab_size(model):
        # Megatron loads embedding and output rows across a size change without a word
        # (allow_shape_mismatch), and every extra row takes probability mass.
        raise CheckpointMismatch(
            f"--load {load_dir}: {path} was trained with a vocabulary padded to {saved_vocab} rows, "
            f"this model has {_padded_vocab_size(model)}: build it with the checkpoint's size "
            "(saved_padded_vocab_size)"
        )
    saved_layout = common["layout"]
    # Another layout has other RNG shards (and their streams would not line up with
    # the new ranks anyway); they only drive dropout, so fresh seeds are harmless.
    with_rng = load_rng and saved_layout == layout
    if load_rng and not with_rng and dist.get_rank() == 0:
        print(
            f"checkpoint {path} was saved with layout {saved_layout}, this run has {layout}: "
            "resharding model and optimizer; RNG states are not restored (they only affect dropout)",
            flush=True,
        )
    _allocate_optimizer_state(optimizer)
    strategy = get_default_load_sharded_strategy(path)
    if fully_parallel:
        strategy = FullyParallelLoadStrategyWrapper(strategy, parallel_state.get_data_parallel_group())
    sharded = _sharded_state_dict(model, optimizer, _saved_sharding_type(common), with_rng=with_rng, is_loading=True)
    loaded = dist_checkpointing.load(sharded, path, strategy)
    for key, chunk in zip(_model_keys(model), unwrap_model(model)):
        chunk.load_state_dict(loaded[key])
    # Under fp32 the distributed optimizer's main params are views of the model's, which
    # require grad; Megatron copies the per-rank format into them in place.
    with torch.no_grad():
        optimizer.load_state_dict(loaded["optimizer"])
    # After the optimizer, whose param groups carry the saved learning rate.
    opt_param_scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if with_rng:
        _set_rng_state(loaded["rng_state"])
    return loaded["state"]


def check_resumable(load_dir: str, tp: int, pp: int, distributed_optimizer: bool,
                    virtual_stages: Optional[int] = None) -> Optional[tuple]:
    """(directory, common state) of the latest checkpoint under `load_dir` if a run with
    these settings can load it; None when there is none. Raises RuntimeError naming --load
    when it cannot."""
    path = latest_checkpoint(load_dir)
    if path is None:
        return None
    common = dist_checkpointing.load_common_state_dict(path)
    if common["distributed_optimizer"] != distributed_optimizer:
        # Megatron's distributed and regular optimizers keep different state structures.
        raise RuntimeError(
            f"--load {load_dir}: {path} was saved {'with' if not distributed_optimizer else 'without'} "
            "--use-distributed-optimizer; resume with the same setting"
        )
    saved = common["layout"]
    # Virtual stages split a rank's parameters into one buffer per model chunk.
    if distributed_optimizer and _saved_sharding_type(common) == PER_RANK and \
            (saved["tp"], saved["pp"], saved.get("vp")) != (tp, pp, virtual_stages):
        raise RuntimeError(
            f"--load {load_dir}: {path} holds the distributed optimizer's state per DP rank, which loads only "
            f"under its --tensor-model-parallel-size {saved['tp']} and --pipeline-model-parallel-size "
            f"{saved['pp']} (this run: {tp} and {pp}), with {saved.get('vp') or 'no'} virtual stages per rank "
            f"(this run: {virtual_stages or 'none'}). Resume under those sizes and save with "
            "--dist-ckpt-optim-fully-reshardable, then change the layout."
        )
    return path, common


def _saved_sharding_type(common: dict) -> str:
    # Checkpoints that predate the record were all saved fully reshardable.
    return common.get("distrib_optim_sharding_type", RESHARDABLE)


def saved_padded_vocab_size(load_dir: str) -> Optional[int]:
    """The padded vocabulary size (rows of the embedding and output layer) of the latest
    checkpoint under `load_dir`; None when there is none, or it predates this record."""
    path = latest_checkpoint(load_dir)
    return None if path is None else dist_checkpointing.load_common_state_dict(path).get("padded_vocab_size")


def latest_checkpoint(load_dir: str) -> Optional[str]:
    """The directory of the last complete save under `load_dir`; None if none was made.

    Raises RuntimeError naming --load when the directory holds something that is not a
    complete save: an unreadable tracker, or checkpoint files without a tracker.
    """
    if not os.path.exists(load_dir):
        return None
    tracker = os.path.join(load_dir, TRACKER)
    if not os.path.exists(tracker):
        unfinished = sorted(n for n in os.listdir(load_dir) if n.startswith("iter_"))
        if unfinished or dist_checkpointing.check_is_distributed_checkpoint(load_dir):
            raise RuntimeError(
                f"--load {load_dir}: no {TRACKER}, so its checkpoint files "
                f"{unfinished or ''} are not a completed save. Point --load at the --save "
                "directory (the parent of iter_*), or delete unfinished iter_* directories."
            )
        return None
    with open(tracker) as f:
        text = f.read().strip()
    if not text.isdigit():
        raise RuntimeError(f"--load {load_dir}: {tracker} should hold an iteration number, not {text!r}")
    path = checkpoint_dir(load_dir, int(text))
    # dist_checkpointing writes metadata.json last, once every rank has saved.
    if not dist_checkpointing.check_is_distributed_checkpoint(path):
        raise RuntimeError(
            f"--load {load_dir}: {tracker} names iteration {text}, "
            f"but {path} is missing or not a complete checkpoint"
        )
    return path


def _comparable(common: dict) -> dict:
    """The common (rank 0 only) state that must agree across ranks, without the trainer's
    `state` (timings may differ) and the distributed optimizer's 'param_state', which the
    memory-efficient gather leaves None off DP rank 0."""

    def without_param_state(value):
        if isinstance(value, dict):
            return {k: without_param_state(v) for k, v in value.items() if k != "param_state"}
        return value

    return {k: without_param_state(v) for k, v in common.items() if k != "state"}


def _model_keys(model: List[torch.nn.Module]) -> List[str]:
    # Megatron-LM's names, one per virtual-pipeline chunk.
    return ["model"] if len(model) == 1 else [f"model{i}" for i in range(len(model))]


def check_reshardable_buckets(model: List[torch.nn.Module]) -> None:
    """Megatron-Core's fully_reshardable format gathers the distributed optimizer's state of a
    buffer as its buckets without their end padding, then slices it at the parameters' padded
    offsets: the state of buckets after a padded one lands in the wrong place. RaPTr's
    per-layer layout (megatron-core 0.17+) counts that padding as content; Megatron's own
    layout (0.16) with several buckets cannot be saved or loaded that way."""
    for chunk in model:
        for buffer in chunk.buffers + chunk.expert_parallel_buffers:
            if any(bucket.numel_unpadded != bucket.grad_data.numel() for bucket in buffer.buckets[:-1]):
                raise RuntimeError(
                    f"--dist-ckpt-optim-fully-reshardable: this megatron-core's fully_reshardable checkpoints "
                    f"misplace the distributed optimizer's state when gradients are split into several buckets "
                    f"(here {len(buffer.buckets)}). Use one bucket (no --overlap-grad-reduce, or a "
                    "--ddp-bucket-size above the model's parameter count), megatron-core 0.17+, or the "
                    "default per-rank format (which needs the saved TP and PP sizes)."
                )


def _sharded_state_dict(model, optimizer, sharding_type: str, with_rng: bool, is_loading: bool) -> dict:
    if sharding_type == RESHARDABLE and optimizer.config.use_distributed_optimizer:
        check_reshardable_buckets(model)
    # Unwrapped, the keys are the GPTModel's own (as in Megatron-LM checkpoints), not DDP's.
    chunks = zip(_model_keys(model), unwrap_model(model))
    sharded = {key: chunk.sharded_state_dict() for key, chunk in chunks}
    sharded["optimizer"] = optimizer.sharded_state_dict(
        dict(sharded), is_loading=is_loading, metadata=_optimizer_metadata(sharding_type)
    )
    if with_rng:
        sharded["rng_state"] = _rng_state()
    return sharded


def _allocate_optimizer_state(optimizer: MegatronOptimizer) -> None:
    """Torch's Adam creates its state in the first step, and without TE/Apex Megatron's
    DistributedOptimizer cannot describe its state for loading before that. Megatron's
    dummy step (zero gradients) creates it; the load then overwrites every value."""
    for sub_optimizer in internals.optimizers_of(optimizer):
        if isinstance(sub_optimizer, DistributedOptimizer) and not sub_optimizer.optimizer.state:
            internals.init_optimizer_states_with_dummy_values(sub_optimizer)


def _padded_vocab_size(model: List[torch.nn.Module]) -> int:
    return unwrap_model(model)[0].vocab_size


def _layout() -> dict:
    """What the RNG shards depend on: the parallel sizes and the device type."""
    layout = {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    # Virtual stages consume a rank's RNG streams in another order. Absent without them, as in
    # checkpoints saved before they were supported.
    virtual = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    return layout if virtual is None else dict(layout, vp=virtual)


def _rng_state() -> ShardedObject:
    """This rank's RNG states; DP ranks are replicas (Megatron seeds by PP and TP rank)."""
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    ps = parallel_state
    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size())
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank())
    return ShardedObject("rng_state", state, shape, offset, replica_id=ps.get_data_parallel_rank())


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
