"""Model FLOPs of GPT and BERT training steps, counting only the layers on the path.

The count follows Megatron-LM's ``num_floating_point_operations`` for a dense
GPT: matrix multiplies only, backward = 2x forward, activation recompute not
counted (model FLOPs, not hardware FLOPs). Attention scores are counted as the
full seq x seq product that Megatron's attention computes, causal (GPT) or
bidirectional (BERT) alike.
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


def bert_head_forward_flops_per_token(config: TransformerConfig, seq_length: int, binary_head: bool) -> float:
    """BERT's heads besides the output layer: the masked-LM transform on every token and, with the
    sentence-order head, the pooler and that head on each sequence's first token."""
    h = config.hidden_size
    per_sequence = 2 * h * (h + 2) if binary_head else 0
    return 2 * h * h + per_sequence / seq_length


def step_flops(config: TransformerConfig, vocab_size: int, seq_length: int, tokens: int, path_length: float,
               head_flops_per_token: float = 0.0) -> float:
    """Training FLOPs (forward + backward) of ``tokens`` tokens through ``path_length`` layers and the
    output layer; ``head_flops_per_token``: other heads' forward FLOPs (BERT's)."""
    per_token = path_length * layer_forward_flops_per_token(config, seq_length) + head_flops_per_token
    return 3 * tokens * (per_token + logits_forward_flops_per_token(config, vocab_size))


def schedule_flops_fraction(
    schedule: RaptrSchedule, train_iters: int, config: TransformerConfig, vocab_size: int, seq_length: int,
    head_flops_per_token: float = 0.0,
) -> float:
    """Expected model FLOPs of a run relative to full training, the heads included."""
    full = step_flops(config, vocab_size, seq_length, 1, schedule.num_layers, head_flops_per_token)
    mean_length = schedule.expected_layer_fraction(train_iters) * schedule.num_layers
    return step_flops(config, vocab_size, seq_length, 1, mean_length, head_flops_per_token) / full
