"""GPT pretraining with Megatron-LM's own loop (megatron.training, megatron-core 0.17+) and RaPTr.

What a Megatron-LM `pretrain_gpt.py` becomes: Megatron-LM's flags, datasets, loop,
checkpoints and logging, plus the lines marked RaPTr.

    torchrun --nproc-per-node 2 examples/pretrain_gpt_megatron_lm.py [Megatron-LM flags] \\
        --raptr-schedule 6@0,8@0.25,10@0.5,12@0.75

Without --raptr-schedule it trains the full model at every step: the baseline.
"""

from functools import partial

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.enums import ModelType
from megatron.training import get_args, get_tokenizer, pretrain
from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
from megatron.training.arguments import parse_and_validate_args
from megatron.training.utils import get_blend_and_blend_per_split

from megatron_raptr import megatron_lm as raptr  # RaPTr


def datasets_provider(train_valid_test_num_samples, vp_stage=None):
    """Megatron-Core GPT datasets (--mock-data: synthetic tokens), built on every rank so
    that every rank reads its own batches: no broadcast across tensor-parallel ranks. Under
    virtual pipeline stages Megatron-LM builds them once per model chunk (`vp_stage`): the same
    batches for each."""
    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend, blend_per_split=blend_per_split,
        split=args.split, path_to_cache=args.data_cache_path, tokenizer=get_tokenizer(),
        reset_position_ids=args.reset_position_ids, reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss, create_attention_mask=args.create_attention_mask_in_dataloader,
    )
    dataset = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(dataset, train_valid_test_num_samples, lambda: True, config).build()


datasets_provider.is_distributed = True  # every rank builds its data loaders


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    device = next(model.parameters()).device
    tokens, labels, loss_mask, position_ids = (batch[key].to(device) for key in
                                               ("tokens", "labels", "loss_mask", "position_ids"))
    attention_mask = batch.get("attention_mask")
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    output = model(tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask)
    return output, partial(loss_func, loss_mask)


def loss_func(loss_mask, per_token_loss):
    """Summed loss and token count (Megatron-LM's schedules average over tokens); the report
    is reduced over microbatches and data-parallel ranks into the logged per-token loss."""
    mask = loss_mask.reshape(-1).float()
    loss = torch.sum(per_token_loss.reshape(-1).float() * mask)
    tokens = mask.sum().to(torch.int)
    return loss, tokens, {"lm loss": torch.stack([loss.detach().clone(), tokens.detach().float()])}


if __name__ == "__main__":
    args = parse_and_validate_args(extra_args_provider=raptr.add_arguments)  # RaPTr: its flags
    raptr.setup(args)  # RaPTr: checks, then the path, DDP, metrics and stage hooks in Megatron-LM's loop
    model_config = gpt_config_from_args(args)  # RaPTr's layers: --spec megatron_raptr.megatron_lm gpt_layer_spec
    pretrain(pretrain_cfg_container_from_args(args, model_config), datasets_provider,
             ModelType.encoder_or_decoder, forward_step)
