"""Mixture of experts under RaPTr: which layers are MoE, and each step's auxiliary losses.

A skipped MoE layer's forward does not run at all: no router, no token dispatch, no experts.
So it adds no auxiliary loss (load balancing, z-loss) to the gradients and records none in
Megatron's MoE metrics tracker, and its aux-loss-free expert bias sees no tokens, which
Megatron's update (a step towards the mean token count, by its sign) leaves unchanged.
"""

import dataclasses
from typing import Dict, List, Sequence

from megatron.core.transformer import TransformerConfig

from megatron_raptr import megatron_internals as internals


def moe_layer_pattern(config: TransformerConfig) -> List[int]:
    """Per layer, 1 for an MoE layer and 0 for a dense one, as Megatron-Core reads --moe-layer-freq."""
    if config.num_moe_experts is None:
        return [0] * config.num_layers
    return list(internals.get_moe_layer_pattern(config))


def aux_loss_names(config: TransformerConfig) -> List[str]:
    """The auxiliary losses Megatron-LM's training_log reports for this config, by its names."""
    balancing = config.moe_router_load_balancing_type
    balancing = balancing if isinstance(balancing, (list, tuple)) else [balancing]
    names = [name for kind, name in (("aux_loss", "load_balancing_loss"), ("seq_aux_loss", "seq_load_balancing_loss"),
                                     ("global_aux_loss", "global_load_balancing_loss")) if kind in balancing]
    return names + (["z_loss"] if config.moe_z_loss_coeff is not None else [])


def step_aux_losses(config: TransformerConfig, active: Sequence[int], num_microbatches: int,
                    keep: bool = False) -> Dict[str, float]:
    """The step's auxiliary losses (Megatron's MoE metrics tracker, reduced over the pipeline stages and
    averaged over the data-parallel ranks and microbatches), each averaged over the MoE layers that ran.
    Resets the tracker for the next step, unless `keep` (Megatron-LM's loop logs and resets it after the
    step). Call on every rank, after the step's forward and backward."""
    if config.num_moe_experts is None:  # a dense model (and megatron-core 0.16, which has no tracker)
        return {}
    internals.check(internals.MOE_TRACKER)
    on_path = set(active)
    ran = [int(moe and layer in on_path) for layer, moe in enumerate(moe_layer_pattern(config), start=1)]
    names = aux_loss_names(config)
    if not any(ran) or not names:  # nothing recorded, on any rank (all know the path)
        return {}
    tracker = internals.get_moe_metrics_tracker()
    if keep:  # report a copy: reporting reduces the values in place and then zeroes them
        tracker, recorded = internals.moe_metrics_tracker(), tracker.metrics
        tracker.metrics.update({name: dataclasses.replace(entry, values=entry.values.clone())
                                for name, entry in recorded.items()})
    totals = {}
    # Megatron-LM's own report, counting as its MoE layers only those that ran (it divides by that count).
    tracker.report(loss_scale=1.0 / num_microbatches, iteration=0, force_initialize=True, track_names=names,
                   num_layers=config.num_layers, moe_layer_freq=ran, total_loss_dict=totals)
    return {name: float(value) for name, value in totals.items()}
