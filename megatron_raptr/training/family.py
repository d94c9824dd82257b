"""Model families: what GPT (decoder) and BERT (encoder) pretraining bring to the one trainer.

Paths and layer gating, DDP, optimizer, LR schedule, checkpoints and metrics are shared; a family
supplies its tokenizer, model, datasets, forward step (with its loss) and head FLOPs.
"""

import argparse
from dataclasses import dataclass
from typing import Callable

from megatron_raptr.training import bert, data, gpt, tokenizer


@dataclass(frozen=True)
class ModelFamily:
    build_tokenizer: Callable  # (args) -> tokenizer for the datasets; its vocab_size sizes the model
    build_model: Callable  # (args, config, vp_stage) -> this pipeline stage's model (chunk), unwrapped
    build_datasets: Callable  # (args, tokenizer) -> (train, valid)
    forward_step: Callable  # Megatron's forward_step_func: (data_iterator, model) -> (output, loss_func)
    head_flops_per_token: Callable  # (args, config) -> forward FLOPs of heads besides the output layer
    validate_data: Callable  # (args) -> None; raises ValueError naming the flag


FAMILIES = {
    "gpt": ModelFamily(tokenizer.build_tokenizer, gpt.build_model, data.build_datasets, gpt.forward_step,
                       head_flops_per_token=lambda args, config: 0.0, validate_data=lambda args: None),
    "bert": ModelFamily(bert.build_tokenizer, bert.build_model, bert.build_datasets, bert.forward_step,
                        bert.head_flops_per_token, bert.validate_data),
}


def model_family(args: argparse.Namespace) -> ModelFamily:
    return FAMILIES[args.model]
