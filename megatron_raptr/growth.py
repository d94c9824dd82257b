"""Gradual stacking's growth: new layers take existing layers' weights, on every rank.

A layer's tensor-parallel shard has the same shape whatever its layer number, so
each tensor-parallel rank copies its own shards. What moves with a layer is its
model weights, the optimizer's fp32 main copy and the Adam moments (zero for a
new layer unless ``--stacking-optimizer-state copy``; a layer that only moves up,
in MIDAS, keeps its own). Under the distributed optimizer each data-parallel rank
holds a slice of those, so a source layer's are first summed over the
data-parallel group from zero-padded slices; under pipeline parallelism a source
layer on another stage is sent over the pipeline group. The optimizer's step counts stay
shared; each layer's own count for bias correction follows in megatron_raptr/adam_steps.py.
"""

from typing import Dict, List, Sequence, Union

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import DistributedOptimizer, MegatronOptimizer

from megatron_raptr import megatron_internals as internals
from megatron_raptr.hooks import StageHook
from megatron_raptr.layer import ModelChunks, raptr_layers
from megatron_raptr.layout import PipelineLayout
from megatron_raptr.stacking import StackingSchedule


class StackingGrowth(StageHook):
    """Grows the model on entering a stacking stage, exactly at its first iteration.

    A run resumed at a boundary (saved just before it) grows then; one resumed after
    it loads the grown weights and does not grow again.
    """

    def __init__(self, model: ModelChunks, optimizer: MegatronOptimizer, layout: Union[PipelineLayout, Sequence[int]]):
        self.model, self.optimizer, self.layout = model, optimizer, PipelineLayout.of(layout)

    def on_stage_start(self, schedule: StackingSchedule, stage: int, iteration: int) -> None:
        if stage > 0 and iteration == schedule.stages[stage].start:
            grow(self.model, self.optimizer, self.layout, schedule.growth(stage),
                 new_layers=() if schedule.optimizer_state == "copy" else schedule.new_layers(stage))


@torch.no_grad()
def grow(model: ModelChunks, optimizer: MegatronOptimizer, layout: Union[PipelineLayout, Sequence[int]],
         growth: Dict[int, int], new_layers: Sequence[int] = ()) -> None:
    """Copies layer ``growth[target]`` into each ``target`` (1-based global layer numbers), whichever
    pipeline rank and virtual stage holds each: weights, main weights and optimizer state; ``new_layers``
    get zero moments instead. Collective over the pipeline and data-parallel groups; every rank passes
    the same arguments."""
    layers = {layer.layer_number: layer for layer in raptr_layers(model)}
    keys = _state_keys(optimizer)
    layout = PipelineLayout.of(layout)
    my_stage = parallel_state.get_pipeline_model_parallel_rank()
    pipeline_ranks = dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())
    # Sources lie below their targets, so from the top down no target is a later source.
    for target in sorted(growth, reverse=True):
        source = growth[target]
        source_stage, target_stage = layout.rank_of(source), layout.rank_of(target)
        if my_stage not in (source_stage, target_stage):
            continue
        template = layers[source] if my_stage == source_stage else layers[target]
        for name, param in template.named_parameters():
            if my_stage == source_stage:
                state = _full_state(optimizer, param, keys)
            else:
                state = torch.empty(len(keys), param.numel(), dtype=torch.float32, device=param.device)
            if source_stage != target_stage:
                if my_stage == source_stage:
                    dist.send(state, pipeline_ranks[target_stage])
                else:
                    dist.recv(state, pipeline_ranks[source_stage])
            if my_stage == target_stage:
                target_param = dict(layers[target].named_parameters())[name]
                _set_state(optimizer, target_param, keys, state, zero_moments=target in new_layers)


def _state_keys(optimizer: MegatronOptimizer) -> List[str]:
    """'param' (the main weights) and the moments the optimizer keeps, the same on every rank
    (Adam creates its state for every parameter in the first step)."""
    for sub in internals.optimizers_of(optimizer):
        for state in sub.optimizer.state.values():
            return ["param"] + sorted(_without_step(state))
    return ["param"]


def _slots(optimizer: MegatronOptimizer, param: torch.nn.Parameter):
    """Where this rank keeps ``param``'s main weights and optimizer state: the flat element
    range [start, end) of the parameter it holds, the tensors holding exactly those elements
    ('param' the main weights, then the moments; not the step count), and the group over
    which the ranges add up to the whole parameter (None: this rank holds all of it)."""
    for sub in internals.optimizers_of(optimizer):
        if isinstance(sub, DistributedOptimizer):
            if param in sub.model_param_gbuf_map:
                shard = internals.get_model_param_range_map(sub, param)["param"]
                tensors = internals.get_main_param_and_optimizer_states(sub, param)
                return shard.start, shard.end, _without_step(tensors), sub.data_parallel_group
            if any(param in buffer.param_index_map for buffer in sub.buffers):
                return 0, 0, {}, sub.data_parallel_group  # all of it on other data-parallel ranks
            continue
        # Float16Optimizer's fp32 copy; for fp32 training the parameter is its own main copy.
        main = getattr(param, "main_param", None)
        main = param if main is None else main
        if any(main is p for group in sub.optimizer.param_groups for p in group["params"]):
            return 0, param.numel(), _without_step({"param": main, **sub.optimizer.state.get(main, {})}), None
    raise ValueError(f"a parameter of shape {tuple(param.shape)} is not in the optimizer")


def _without_step(tensors: dict) -> Dict[str, torch.Tensor]:
    return {key: value for key, value in tensors.items() if key != "step"}


def _full_state(optimizer: MegatronOptimizer, param: torch.nn.Parameter, keys: List[str]) -> torch.Tensor:
    """The whole of ``param``'s main weights and state, one fp32 row per key."""
    start, end, tensors, group = _slots(optimizer, param)
    state = torch.zeros(len(keys), param.numel(), dtype=torch.float32, device=param.device)
    for row, key in enumerate(keys):
        if key in tensors:
            state[row, start:end] = tensors[key].reshape(-1)
    if group is not None:
        dist.all_reduce(state, group=group)  # data-parallel slices are disjoint
    return state


def _set_state(optimizer: MegatronOptimizer, param: torch.nn.Parameter, keys: List[str], state: torch.Tensor,
               zero_moments: bool) -> None:
    start, end, tensors, _ = _slots(optimizer, param)
    param.copy_(state[keys.index("param")].view_as(param))  # the model weights, in the model's dtype
    for row, key in enumerate(keys):
        if key not in tensors:
            continue
        if key != "param" and zero_moments:
            tensors[key].zero_()
        else:
            tensors[key].copy_(state[row, start:end].view_as(tensors[key]))
