"""GPT (decoder) pretraining: Megatron-Core's GPTModel with RaPTr layers and its next-token loss."""

import argparse
from functools import partial
from typing import Iterator, Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from megatron_raptr.layer import get_gpt_raptr_block_spec
from megatron_raptr.training import data


def language_model_kwargs(args: argparse.Namespace, config: TransformerConfig, vp_stage: Optional[int]) -> dict:
    """What Megatron-Core's GPTModel and BertModel take alike from the flags, for this pipeline stage's
    model chunk of virtual stage `vp_stage` (None without virtual stages)."""
    return dict(
        config=config,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        vp_stage=vp_stage,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
    )


def build_model(args: argparse.Namespace, config: TransformerConfig, vp_stage: Optional[int] = None) -> GPTModel:
    """This pipeline stage's GPT (its chunk of virtual stage `vp_stage`) with RaPTr-gated layers (unwrapped)."""
    return GPTModel(transformer_layer_spec=get_gpt_raptr_block_spec(config, vp_stage=vp_stage),
                    **language_model_kwargs(args, config, vp_stage))


def forward_step(data_iterator: Iterator[dict], model: torch.nn.Module):
    batch = data.stage_batch(data_iterator, first_stage=("tokens", "position_ids"), last_stage=("labels", "loss_mask"),
                             every_stage=("attention_mask",))  # a mask only with --reset-attention-mask
    output = model(batch.get("tokens"), batch.get("position_ids"), batch.get("attention_mask"),
                   labels=batch.get("labels"))
    return output, partial(masked_mean_loss, batch.get("loss_mask"))


def masked_mean_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Mean of the per-token loss where loss_mask is set, reported as Megatron-LM's "lm loss"."""
    mask = loss_mask.reshape(-1).float()
    loss = torch.sum(per_token_loss.reshape(-1).float() * mask) / mask.sum().clamp(min=1)
    # A copy: Megatron's schedules divide the returned loss by the microbatch count in place.
    return loss, {"lm loss": loss.detach().clone()}
