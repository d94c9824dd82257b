"""Builds the model (GPT or BERT), Megatron DDP, optimizer and LR schedule from parsed arguments."""

import argparse
from typing import List, Tuple

import torch
from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module

from megatron_raptr.ddp import RaptrDistributedDataParallel
from megatron_raptr.training import checkpointing
from megatron_raptr.training.family import model_family
from megatron_raptr.training.initialize import current_device


def padded_vocab_size(vocab_size: int, args: argparse.Namespace) -> int:
    """Rows of the embedding and output layer for a tokenizer of `vocab_size` ids.

    Megatron-LM pads the vocabulary to a multiple of --make-vocab-size-divisible-by x TP,
    so that tensor-parallel shards are equal; the padding thus changes with TP. Padding rows
    take probability mass too, so a run that loads a checkpoint keeps the checkpoint's
    padded size: resharding must not change the model. Raises ValueError naming the flag
    when this layout cannot hold it.
    """
    saved = checkpointing.saved_padded_vocab_size(args.load) if args.load else None
    tp = args.tensor_model_parallel_size
    if saved is None:
        multiple = args.make_vocab_size_divisible_by * tp
        return -(-vocab_size // multiple) * multiple
    if saved < vocab_size:
        raise ValueError(f"--load {args.load}: the checkpoint's vocabulary has {saved} rows, fewer than the "
                         f"tokenizer's {vocab_size} ids: resume with the tokenizer it was trained with")
    if saved % tp:
        raise ValueError(f"--load {args.load}: the checkpoint's vocabulary is padded to {saved} rows, which "
                         f"--tensor-model-parallel-size {tp} cannot split evenly: use a size that divides {saved} "
                         "(train with a larger --make-vocab-size-divisible-by to reshard to more ranks later)")
    return saved


def params_dtype(args: argparse.Namespace) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def transformer_config(args: argparse.Namespace) -> TransformerConfig:
    dtype = params_dtype(args)
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        normalization=args.normalization,
        gated_linear_unit=args.swiglu,
        activation_func=torch.nn.functional.silu if args.swiglu else torch.nn.functional.gelu,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=args.bf16,
        fp16=args.fp16,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method if args.recompute_granularity == "full" else None,
        recompute_num_layers=args.recompute_num_layers if args.recompute_granularity == "full" else None,
    )


def build_model(args: argparse.Namespace, config: TransformerConfig) -> List[torch.nn.Module]:
    """This rank's model chunk (--model) with RaPTr-gated layers, wrapped in Megatron DDP.

    The baseline uses the same model: its path is simply every layer at every step.
    """
    model = model_family(args).build_model(args, config)
    model.to(current_device())
    if args.bf16 or args.fp16:
        model = Float16Module(config, model)  # casts inputs to half, the last stage's output to fp32
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=args.bf16 or args.fp16,
        overlap_grad_reduce=args.overlap_grad_reduce,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    ddp = RaptrDistributedDataParallel(config, ddp_config, model, skip_idle_grad_comm=args.raptr_skip_grad_comm)
    return [ddp]


def build_optimizer(
    args: argparse.Namespace, config: TransformerConfig, model: List[torch.nn.Module]
) -> Tuple[MegatronOptimizer, OptimizerParamScheduler]:
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=args.lr,
            min_lr=args.min_lr,
            weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2,
            adam_eps=args.adam_eps,
            clip_grad=args.clip_grad,
            bf16=args.bf16,
            fp16=args.fp16,
            params_dtype=params_dtype(args),
            use_distributed_optimizer=args.use_distributed_optimizer,
        ),
        model,
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=args.lr_decay_iters,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters,
        wd_incr_style="constant",
    )
    # Megatron's schedules drive gradient sync through these hooks.
    config.no_sync_func = model[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    return optimizer, scheduler
