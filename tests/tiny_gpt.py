"""A tiny Megatron-Core GPT trained with Megatron's DDP, optimizer and schedules.

For multi-rank tests: call after initialize_distributed(); the layout (TP, PP, DP)
comes from megatron.core.parallel_state. When every layout trains on global_batch()
(each DP rank on its share) from the same weights (load_full_state), losses are
comparable across layouts.
"""

import torch
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module

VOCAB, SEQ, GLOBAL_BATCH = 128, 32, 4


def build_gpt(position_embedding_type="learned_absolute", layer_spec=None, **config_overrides):
    """The unwrapped GPTModel of this rank's pipeline stage and its config."""
    config = TransformerConfig(
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        # Dropout would draw from TP-dependent RNG streams and break cross-layout equality.
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        pipeline_dtype=torch.bfloat16 if config_overrides.get("bf16") else torch.float32,
        **config_overrides,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec or get_gpt_layer_local_spec(),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type=position_embedding_type,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        # Tied weights exercise the embedding all-reduce between first and last stage.
        share_embeddings_and_output_weights=True,
    )
    return model, config


def wrap(model, config, use_distributed_optimizer=False, overlap_grad_reduce=False, overlap_param_gather=False,
         ddp_class=DistributedDataParallel, bucket_size=None, **ddp_kwargs):
    """Megatron DDP (or `ddp_class`, given `ddp_kwargs`) around `model` plus an Adam optimizer
    (bf16 with fp32 main weights if config.bf16, else fp32); sets the training-loop hooks on `config`."""
    if config.bf16:
        model = Float16Module(config, model)
    ddp = ddp_class(
        config=config,
        ddp_config=DistributedDataParallelConfig(
            use_distributed_optimizer=use_distributed_optimizer,
            overlap_grad_reduce=overlap_grad_reduce,
            overlap_param_gather=overlap_param_gather,
            bucket_size=bucket_size,
        ),
        module=model,
        **ddp_kwargs,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=1e-3,
            use_distributed_optimizer=use_distributed_optimizer,
            overlap_param_gather=overlap_param_gather,
            bf16=config.bf16,
            params_dtype=config.params_dtype,
        ),
        [ddp],
    )
    # As Megatron-LM's training loop: reduce grads once per step, then across DP and
    # tied embeddings in finalize_model_grads.
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return ddp, optimizer


def raptr_start():
    """Initializes the process group; returns the initial weights of a RaPTr-gated GPT and this
    data-parallel rank's share of global_batch(), for runs that must start alike."""
    from megatron_raptr import get_gpt_raptr_layer_spec
    from megatron_raptr.training.initialize import initialize_distributed

    initialize_distributed()
    model, _ = build_gpt(layer_spec=get_gpt_raptr_layer_spec())
    initial = [param.detach().clone() for param in model.parameters()]
    batches = global_batch().chunk(parallel_state.get_data_parallel_world_size())
    return initial, batches[parallel_state.get_data_parallel_rank()]


def global_batch(seed=0):
    """GLOBAL_BATCH sequences of SEQ + 1 token ids, identical on every rank."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=generator)


def _forward_step(data_iterator, model):
    tokens = next(data_iterator)
    position_ids = torch.arange(SEQ).expand(tokens.shape[0], SEQ)
    output = model(tokens[:, :-1], position_ids, attention_mask=None, labels=tokens[:, 1:])

    def loss_func(per_token_loss):
        loss = per_token_loss.float().mean()
        # clone: the schedule divides the returned loss in place by num_microbatches.
        return loss, {"loss": loss.detach().clone()}

    return output, loss_func


def train(ddp, optimizer, config, batch, steps, before_step=lambda step: None):
    """Run `steps` optimizer steps on this DP rank's `batch`, one sequence per
    microbatch, calling before_step(step) first. Returns each step's loss averaged over
    data-parallel ranks on the last pipeline stage, None on other stages."""
    forward_backward = get_forward_backward_func()
    losses = []
    for step in range(steps):
        before_step(step)
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        outputs = forward_backward(
            forward_step_func=_forward_step,
            data_iterator=iter(batch.split(1)),
            model=[ddp],
            num_microbatches=batch.shape[0],
            seq_length=SEQ,
            micro_batch_size=1,
        )
        update_successful, _, _ = optimizer.step()
        assert update_successful
        if parallel_state.is_pipeline_last_stage():
            loss = torch.stack([o["loss"] for o in outputs]).mean()
            torch.distributed.all_reduce(loss, group=parallel_state.get_data_parallel_group())
            losses.append(loss.item() / parallel_state.get_data_parallel_world_size())
    return losses if parallel_state.is_pipeline_last_stage() else None


def load_full_state(model, full):
    """Copy a single-rank (TP=1, PP=1) parameter dict into this rank's shards of `model`."""
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    layer_offset = model.decoder.layers[0].layer_number - 1  # this stage's first layer
    for name, param in model.named_parameters():
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            parts[2] = str(int(parts[2]) + layer_offset)
        elif name == "output_layer.weight":
            # The last stage's copy of the tied embedding.
            parts = ["embedding", "word_embeddings", "weight"]
        value = full[".".join(parts)]
        if getattr(param, "tensor_model_parallel", False):
            assert param.partition_stride == 1
            value = value.chunk(tp_size, dim=param.partition_dim)[tp_rank]
        with torch.no_grad():
            param.copy_(value)
