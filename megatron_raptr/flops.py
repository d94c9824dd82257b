"""Model FLOPs of GPT and BERT training steps, counting only the layers on the path.

The count follows Megatron-LM's ``num_floating_point_operations`` for a dense
GPT (an MoE layer: its router and the top-k experts per token): matrix multiplies only,
backward = 2x forward, activation recompute not counted (model FLOPs, not hardware FLOPs). Attention scores are counted as the
full seq x seq product that Megatron's attention computes, causal (GPT) or
bidirectional (BERT) alike.
"""

from typing import Sequence, Union

from megatron.core.transformer import TransformerConfig

from megatron_raptr.moe import moe_layer_pattern
from megatron_raptr.schedule import RaptrSchedule


def layer_forward_flops_per_token(config: TransformerConfig, seq_length: int, moe: bool = False) -> int:
    """A dense layer's forward FLOPs per token; an MoE layer's (``moe``): its router and the MLPs of
    the top-k experts each token goes to (and the shared experts, if any)."""
    h = config.hidden_size
    query = config.kv_channels * config.num_attention_heads
    key_value = config.kv_channels * (config.num_query_groups or config.num_attention_heads)
    mlp_inputs = 2 if config.gated_linear_unit else 1
    if moe:
        mlp_hidden = config.moe_router_topk * config.moe_ffn_hidden_size + (
            config.moe_shared_expert_intermediate_size or 0)
        router = h * config.num_moe_experts
    else:
        mlp_hidden, router = config.ffn_hidden_size, 0
    return 2 * (
        h * (query + 2 * key_value)  # QKV projection
        + 2 * seq_length * query  # scores and weighted values
        + query * h  # output projection
        + router
        + (mlp_inputs + 1) * h * mlp_hidden  # fc1 (x2 when gated) and fc2
    )


def layers_forward_flops_per_token(config: TransformerConfig, seq_length: int,
                                   layers: Union[float, Sequence[int]]) -> float:
    """Forward FLOPs per token of ``layers``: 1-based layer numbers, or a number of layers of the
    model's mean layer cost (an expected path length; all of them: the whole model's)."""
    pattern = moe_layer_pattern(config)
    cost = {moe: layer_forward_flops_per_token(config, seq_length, bool(moe)) for moe in set(pattern)}
    if isinstance(layers, (int, float)):
        return layers * sum(cost[moe] for moe in pattern) / len(pattern)
    return sum(cost[pattern[layer - 1]] for layer in layers)


def logits_forward_flops_per_token(config: TransformerConfig, vocab_size: int) -> int:
    return 2 * config.hidden_size * vocab_size


def bert_head_forward_flops_per_token(config: TransformerConfig, seq_length: int, binary_head: bool) -> float:
    """BERT's heads besides the output layer: the masked-LM transform on every token and, with the
    sentence-order head, the pooler and that head on each sequence's first token."""
    h = config.hidden_size
    per_sequence = 2 * h * (h + 2) if binary_head else 0
    return 2 * h * h + per_sequence / seq_length


def step_flops(config: TransformerConfig, vocab_size: int, seq_length: int, tokens: int,
               layers: Union[float, Sequence[int]], head_flops_per_token: float = 0.0) -> float:
    """Training FLOPs (forward + backward) of ``tokens`` tokens through ``layers`` (layer numbers, or a
    number of layers) and the output layer; ``head_flops_per_token``: other heads' forward FLOPs (BERT's)."""
    per_token = layers_forward_flops_per_token(config, seq_length, layers) + head_flops_per_token
    return 3 * tokens * (per_token + logits_forward_flops_per_token(config, vocab_size))


def schedule_flops_fraction(
    schedule: RaptrSchedule, train_iters: int, config: TransformerConfig, vocab_size: int, seq_length: int,
    head_flops_per_token: float = 0.0,
) -> float:
    """Expected model FLOPs of a run relative to full training, the heads included."""
    full = step_flops(config, vocab_size, seq_length, 1, schedule.num_layers, head_flops_per_token)
    mean_length = schedule.expected_layer_fraction(train_iters) * schedule.num_layers
    return step_flops(config, vocab_size, seq_length, 1, mean_length, head_flops_per_token) / full
