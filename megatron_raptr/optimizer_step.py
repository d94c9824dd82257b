"""The optimizer step with skipped layers: each layer's own Adam step count, and, with
--raptr-skip-optimizer-step, no step for the layers off the path.

Megatron's optimizer step is prepare_grads() (model gradients to the main parameters' .grad),
clipping, then step_with_ready_grads() (the inner Adam step, main parameters copied to the
model, the distributed optimizer's all-gather). get_megatron_optimizer chooses the classes, so
both are wrapped on the instance:

- Step counts (megatron_raptr/adam_steps.py): the inner Adam step runs every parameter with its
  layer's count n = t - missed, as a per-parameter Adam that took only those n steps would:
  torch's Adam keeps a count per parameter, set for the step; FusedAdam (Apex, Transformer Engine)
  keeps one per group, so the groups are split by count for the step. Afterwards every count is
  the shared t + 1 again, which is what Megatron's checkpoints hold.
- Skipping (--raptr-skip-optimizer-step): before step_with_ready_grads the main parameters of
  skipped layers lose their .grad; torch's Adam/AdamW and FusedAdam leave a parameter without a
  gradient alone, so its weights, exp_avg and exp_avg_sq stay as they are and no weight decay
  applies, and with the distributed optimizer bucket groups the step left unchanged are not
  all-gathered. Clipping and NaN checks ran before, on the same zero gradients as ever. Every
  parameter gets its zero Adam state before the first step rather than at its first update, so
  that it has a count to set and is saved with the others.
"""

from contextlib import ExitStack, contextmanager, nullcontext
from typing import Dict, List, Sequence, Tuple

import torch
from megatron.core.optimizer import DistributedOptimizer, MegatronOptimizer

from megatron_raptr import megatron_internals as internals
from megatron_raptr.adam_steps import MissedSteps
from megatron_raptr.ddp import RaptrDistributedDataParallel
from megatron_raptr.layer import raptr_layers


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


def install_optimizer_step(optimizer: MegatronOptimizer, model: Sequence[torch.nn.Module],
                           skip_off_path: bool, sampler=None, catch_up_weight_decay: bool = False) -> MissedSteps:
    """Makes `optimizer` step each parameter with its layer's own Adam count and, with
    `skip_off_path`, not at all for the parameters each RaptrDistributedDataParallel chunk of
    `model` reports skipped (PathSetter sets them per step); their bucket groups then take no
    all-gather. With `catch_up_weight_decay` too, a layer's first update after k skipped steps first
    scales its weights by (1 - lr x wd)^k at that step's LR and weight decay (lazy AdamW's rule).
    `sampler` gives the paths of steps taken before (a resumed run's). Returns the missed-step counts
    (for checkpoints)."""
    chunks = [chunk for chunk in model if isinstance(chunk, RaptrDistributedDataParallel)]
    if not chunks:
        raise TypeError("RaPTr's optimizer step needs RaptrDistributedDataParallel")
    for chunk in chunks:
        chunk.skipped_take_no_step = skip_off_path
    layer_of = {param: layer.layer_number for chunk in chunks for layer in raptr_layers(chunk)
                for param in layer.parameters()}
    missed = MissedSteps(chunks[0].config.num_layers, skip_off_path, sampler)
    if catch_up_weight_decay and not skip_off_path:
        raise ValueError("catching up weight decay needs skip_off_path: otherwise skipped layers decay every step")
    for leaf in internals.optimizers_of(optimizer):
        _wrap(leaf, chunks, layer_of, missed, skip_off_path, catch_up_weight_decay)
    return missed


def _wrap(optimizer: MegatronOptimizer, chunks: List[RaptrDistributedDataParallel],
          layer_of: Dict[torch.nn.Parameter, int], missed: MissedSteps, skip_off_path: bool,
          catch_up_weight_decay: bool) -> None:
    main_of = main_parameters(optimizer)
    layer_of_main = {main: layer_of[param] for param, main in main_of.items() if param in layer_of}
    inner = optimizer.optimizer
    group_of = {param: index for index, group in enumerate(inner.param_groups) for param in group["params"]}
    step_with_ready_grads, inner_step = optimizer.step_with_ready_grads, inner.step
    missed_of = {}  # main parameter -> the steps its layer missed, for this step
    states_created = False

    def step_on_path():
        nonlocal states_created
        if not states_created:
            # At the first step that is taken, not before: Megatron's checkpoints lose a count of 0
            # (a step skipped by the fp16 loss scaler leaves it so), and then fail to load.
            _create_states(inner, inner_step)
            states_created = True
        path = chunks[0].path
        if path is None:  # no path applied: the full model
            return step_with_ready_grads()
        missed_now = missed.through(path)
        missed_of.clear()
        missed_of.update((main, missed_now[layer]) for main, layer in layer_of_main.items() if missed_now[layer])
        if skip_off_path:
            for param in (main_of[param] for chunk in chunks for param in chunk.skipped_parameters
                          if param in main_of):  # the distributed optimizer: a shard on this rank
                param.grad = None
        if catch_up_weight_decay:
            _catch_up_weight_decay(inner, {main: (group_of[main], missed.skipped_before[layer])
                                           for main, layer in layer_of_main.items() if missed.skipped_before[layer]})
        with ExitStack() as stack:
            for chunk in chunks:
                stack.enter_context(chunk.param_sync_of_changed_groups())
            return step_with_ready_grads()

    def step_with_own_counts(*args, **kwargs):
        with _own_counts(inner, missed_of):
            return inner_step(*args, **kwargs)

    optimizer.step_with_ready_grads = step_on_path
    inner.step = step_with_own_counts


@torch.no_grad()
def _catch_up_weight_decay(inner: torch.optim.Optimizer, skipped: Dict[torch.nn.Parameter, Tuple[int, int]]) -> None:
    """Main parameter -> (its group's index, steps it skipped in a row): the decay of those steps, at
    this step's LR and weight decay."""
    for param, (index, steps) in skipped.items():
        group = inner.param_groups[index]
        param.mul_((1.0 - group["lr"] * group["weight_decay"]) ** steps)


def _own_counts(inner: torch.optim.Optimizer, missed_of: Dict[torch.nn.Parameter, int]):
    """During one inner step, each parameter in `missed_of` counts that many steps fewer (at least
    its first); afterwards every count is the shared one, advanced by the step."""
    if not missed_of:
        return nullcontext()
    if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
        return _counts_per_parameter(inner, missed_of)
    # FusedAdam. (torch's Adam ignores a 'step' in its groups, which Megatron's distributed checkpoints put there.)
    return _counts_per_group(inner, missed_of)


@contextmanager
def _counts_per_group(inner: torch.optim.Optimizer, missed_of: Dict[torch.nn.Parameter, int]):
    """FusedAdam (Apex, Transformer Engine) counts steps per group: the groups are split by count."""
    groups = inner.param_groups
    split = {}
    for index, group in enumerate(groups):
        for param in group["params"]:
            count = max(group["step"] - missed_of.get(param, 0), 0)
            split.setdefault((index, count), dict(group, params=[], step=count))["params"].append(param)
    inner.param_groups = list(split.values())
    try:
        yield
    finally:
        inner.param_groups = groups
    for group in groups:
        group["step"] += 1


@contextmanager
def _counts_per_parameter(inner: torch.optim.Optimizer, missed_of: Dict[torch.nn.Parameter, int]):
    """torch's Adam counts steps per parameter (a tensor each): each is set for the step."""
    shared = {param: inner.state[param]["step"] for param in missed_of
              if "step" in inner.state.get(param, {})}  # empty parameters have no state
    for param, step in shared.items():
        inner.state[param]["step"] = (step - missed_of[param]).clamp(min=0)
    try:
        yield
    finally:  # also the skipped parameters' counts, which the step did not advance
        for param, step in shared.items():
            inner.state[param]["step"] = step + 1


def _create_states(inner: torch.optim.Optimizer, step) -> None:
    """Gives every parameter its Adam state now, as a first step would (zeros, step 0), by a `step`
    that moves nothing (zero gradients, learning rate and weight decay 0); once."""
    params = [param for group in inner.param_groups for param in group["params"] if param.numel()]
    if any(param in inner.state for param in params):
        return
    saved = [(group["lr"], group["weight_decay"]) for group in inner.param_groups]
    for group in inner.param_groups:
        group["lr"] = group["weight_decay"] = 0.0
    grads = [param.grad for param in params]
    for param in params:
        param.grad = torch.zeros_like(param)
    step()
    for group, (lr, weight_decay) in zip(inner.param_groups, saved):
        group["lr"], group["weight_decay"] = lr, weight_decay
        if "step" in group:  # FusedAdam's count per group
            group["step"] = 0
    for param, grad in zip(params, grads):
        param.grad = grad
        if "step" in inner.state[param]:
            inner.state[param]["step"].zero_()
