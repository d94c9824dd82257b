"""Independent references for RaPTr models: plain Megatron GPTs built from the same weights."""

from typing import Dict, Sequence

import torch


def active_layers_state_dict(state: Dict[str, torch.Tensor], active: Sequence[int]) -> Dict[str, torch.Tensor]:
    """The state dict of a dense GPT whose layers are `active` (1-based) of `state`'s, in order."""
    dense = {}
    for name, value in state.items():
        if not name.startswith("decoder.layers."):
            dense[name] = value
            continue
        index, rest = name[len("decoder.layers."):].split(".", 1)
        if int(index) + 1 in active:
            dense[f"decoder.layers.{list(active).index(int(index) + 1)}.{rest}"] = value
    return dense
