"""RaPTr: random-path progressive subnetwork training for Megatron-Core.

Integration in an existing Megatron-Core loop::

    schedule = RaptrSchedule.parse("6@0,8@0.25,10@0.5,12@0.75", num_layers=12, train_iters=N)
    sampler = PathSampler(schedule, seed, layout=pipeline_layout(config))
    model = GPTModel(config, transformer_layer_spec=get_gpt_raptr_layer_spec(), ...)
    model = RaptrDistributedDataParallel(config, ddp_config, model)
    set_path = PathSetter(model)
    for iteration in range(N):
        set_path(sampler.path(iteration))
        ...  # Megatron forward_backward_func + optimizer step as usual
"""

from megatron_raptr.ddp import RaptrDistributedDataParallel
from megatron_raptr.layer import (
    PathSetter,
    RaptrTransformerLayer,
    get_bert_raptr_layer_spec,
    get_gpt_raptr_block_spec,
    get_gpt_raptr_layer_spec,
    raptr_decoder_spec,
    raptr_layer_spec,
)
from megatron_raptr.layout import pipeline_layout
from megatron_raptr.sampler import Path, PathSampler
from megatron_raptr.schedule import RaptrSchedule, Stage
from megatron_raptr.sync import verify_path_sync

__all__ = [
    "Path",
    "PathSampler",
    "PathSetter",
    "RaptrDistributedDataParallel",
    "RaptrSchedule",
    "RaptrTransformerLayer",
    "Stage",
    "get_bert_raptr_layer_spec",
    "get_gpt_raptr_block_spec",
    "get_gpt_raptr_layer_spec",
    "pipeline_layout",
    "raptr_decoder_spec",
    "raptr_layer_spec",
    "verify_path_sync",
]
