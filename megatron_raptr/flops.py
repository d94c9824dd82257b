"""Model FLOPs of GPT training steps, counting only the layers on the path.

The count follows Megatron-LM's ``num_floating_point_operations`` for a dense
GPT: matrix multiplies only, backward = 2x forward, activation recompute not
counted (model FLOPs, not hardware FLOPs). Attention scores are counted as the
full seq x seq product that Megatron's attention computes.
"""

from megatron.core.transformer import TransformerConfig

from megatron_raptr.schedule import RaptrSchedule


def layer_forward_flops_per_token(config: TransformerConfig, seq_length: int) -> int:
    h = config.hidden_size
    query = config.kv_channels * config.num_attention_heads
    key_value = config.kv_channels * (config.num_query_groups or config.num_attention_heads)
    mlp_inputs = 2 if config.gated_linear_unit else 1
    return 2 * (
        h * (query + 2 * key_value)  # QKV projection
        + 2 * seq_length * query  # scores and weighted values
        + query * h  # output projection
        + (mlp_inputs + 1) * h * config.ffn_hidden_size  # fc1 (x2 when gated) and fc2
    )


def logits_forward_flops_per_token(config: TransformerConfig, vocab_size: int) -> int:
    return 2 * config.hidden_size * vocab_size


def step_flops(config: TransformerConfig, vocab_size: int, seq_length: int, tokens: int, path_length: float) -> float:
    """Training FLOPs (forward + backward) of ``tokens`` tokens through ``path_length`` layers."""
    per_token = path_length * layer_forward_flops_per_token(config, seq_length)
    return 3 * tokens * (per_token + logits_forward_flops_per_token(config, vocab_size))


def schedule_flops_fraction(
    schedule: RaptrSchedule, train_iters: int, config: TransformerConfig, vocab_size: int, seq_length: int
) -> float:
    """Expected model FLOPs of a run relative to full training, the output layer included."""
    full = step_flops(config, vocab_size, seq_length, 1, schedule.num_layers)
    mean_length = schedule.expected_layer_fraction(train_iters) * schedule.num_layers
    return step_flops(config, vocab_size, seq_length, 1, mean_length) / full
