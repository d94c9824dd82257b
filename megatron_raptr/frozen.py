"""--raptr-skip-optimizer-step: the layers off a step's path take no optimizer step.

Megatron's optimizer step is prepare_grads() (model gradients to the main parameters'
.grad), clipping, then step_with_ready_grads() (the inner Adam step, main parameters
copied to the model, the distributed optimizer's all-gather). Before the latter, the main
parameters of this step's skipped layers lose their .grad: torch's Adam/AdamW (and Apex or
Transformer Engine FusedAdam) leave a parameter without a gradient alone, so its weights,
exp_avg and exp_avg_sq stay as they are and no weight decay applies. Clipping and NaN
checks ran before, on the same zero gradients as ever.

One step count for all parameters, as LazyAdam: FusedAdam counts steps per parameter
group, but torch's Adam per parameter, and Megatron's checkpoints hold one count. So
here a skipped parameter's own count advances with the others, and every parameter gets
its (zero) Adam state before the first step rather than at its first update.
"""

from contextlib import ExitStack
from typing import Dict, List, Sequence

import torch
from megatron.core.optimizer import DistributedOptimizer, MegatronOptimizer

from megatron_raptr.ddp import RaptrDistributedDataParallel


def main_parameters(optimizer: MegatronOptimizer) -> Dict[torch.nn.Parameter, torch.nn.Parameter]:
    """Model parameter -> the parameter the inner optimizer steps for it on this rank (the
    distributed optimizer: its shard's main parameter; parameters without a shard here are absent)."""
    params = optimizer.optimizer.param_groups
    if isinstance(optimizer, DistributedOptimizer):
        return {model: params[group]["params"][order]
                for model, (group, order) in optimizer.model_param_group_index_map.items()}
    if hasattr(optimizer, "float16_groups"):  # Float16OptimizerWithFloat16Params: fp32 main copies
        pairs = [zip(model, main) for model, main in zip(optimizer.float16_groups,
                                                         optimizer.fp32_from_float16_groups)]
        pairs += [((param, param) for param in group) for group in optimizer.fp32_from_fp32_groups]
        return {model: main for pair in pairs for model, main in pair}
    return {param: param for group in params for param in group["params"]}  # FP32Optimizer


def skip_optimizer_step_off_path(optimizer: MegatronOptimizer, model: Sequence[torch.nn.Module]) -> None:
    """From now on, the parameters each RaptrDistributedDataParallel chunk of `model` reports skipped
    (PathSetter sets them per step) take no step of `optimizer`, and their bucket groups no all-gather.

    get_megatron_optimizer chooses and builds the optimizer classes, so each (chained) optimizer's
    step_with_ready_grads is wrapped on the instance.
    """
    chunks = [chunk for chunk in model if isinstance(chunk, RaptrDistributedDataParallel)]
    if not chunks:
        raise TypeError("skipping the optimizer step of skipped layers needs RaptrDistributedDataParallel")
    for chunk in chunks:
        chunk.skipped_take_no_step = True
    for leaf in getattr(optimizer, "chained_optimizers", [optimizer]):
        _wrap(leaf, chunks)


def _wrap(optimizer: MegatronOptimizer, chunks: List[RaptrDistributedDataParallel]) -> None:
    main_of = main_parameters(optimizer)
    inner = optimizer.optimizer
    per_param_step = _create_states(inner)
    step_with_ready_grads = optimizer.step_with_ready_grads

    def step_skipping_off_path():
        frozen = [main_of[param] for chunk in chunks for param in chunk.skipped_parameters if param in main_of]
        for param in frozen:
            param.grad = None
        with ExitStack() as stack:
            for chunk in chunks:
                stack.enter_context(chunk.param_sync_of_changed_groups())
            success = step_with_ready_grads()
        if per_param_step:
            for param in frozen:
                inner.state[param]["step"] += 1
        return success

    optimizer.step_with_ready_grads = step_skipping_off_path


def _create_states(inner: torch.optim.Optimizer) -> bool:
    """Gives every parameter its Adam state now, as a first step would (zeros, step 0), by a step
    that moves nothing (zero gradients, learning rate and weight decay 0). Returns whether the
    step count is per parameter (torch's Adam keeps it in the state)."""
    params = [param for group in inner.param_groups for param in group["params"] if param.numel()]
    if any(param in inner.state for param in params):
        return "step" in next(iter(inner.state.values()))
    saved = [(group["lr"], group["weight_decay"]) for group in inner.param_groups]
    for group in inner.param_groups:
        group["lr"] = group["weight_decay"] = 0.0
    for param in params:
        param.grad = torch.zeros_like(param)
    inner.step()
    for group, (lr, weight_decay) in zip(inner.param_groups, saved):
        group["lr"], group["weight_decay"] = lr, weight_decay
        if "step" in group:  # FusedAdam's count per group
            group["step"] = 0
    per_param_step = False
    for param in params:
        param.grad = None
        if "step" in inner.state[param]:
            inner.state[param]["step"].zero_()
            per_param_step = True
    return per_param_step
