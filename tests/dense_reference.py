"""Independent references for RaPTr models: plain Megatron GPTs and BERTs built from the same weights."""

from typing import Dict, Sequence

import torch


def active_layers_state_dict(state: Dict[str, torch.Tensor], active: Sequence[int],
                             stack: str = "decoder") -> Dict[str, torch.Tensor]:
    """The state dict of a dense model whose layers are `active` (1-based) of `state`'s, in order.

    `stack`: the transformer block's name, "decoder" (GPTModel) or "encoder" (BertModel).
    """
    prefix = f"{stack}.layers."
    dense = {}
    for name, value in state.items():
        if not name.startswith(prefix):
            dense[name] = value
            continue
        index, rest = name[len(prefix):].split(".", 1)
        if int(index) + 1 in active:
            dense[f"{prefix}{list(active).index(int(index) + 1)}.{rest}"] = value
    return dense
