"""How far one optimizer step moved each transformer layer, in units of the learning rate.

Reads the model weights of two checkpoints of a run (pretrain_raptr.py's or Megatron-LM's torch_dist
format; any layout: the shards are read as the whole tensors) and prints, per layer, the largest
|w_after - w_before| / LR over each of its weight matrices. Adam's first step on a fresh parameter
moves each element by about 1.0 x LR; a layer whose bias correction counts steps it did not take
moves by more or less.

    python tools/update_size.py --load CKPT --iterations 1500 1501 --lr 1e-3
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

PREFIX = "decoder.layers."


def layer_weights(directory: Path) -> dict:
    """Name -> tensor of each stacked layer weight (first dimension: the layer) in a torch_dist checkpoint."""
    reader = dcp.FileSystemReader(str(directory))
    metadata = reader.read_metadata().state_dict_metadata
    state = {name: torch.empty(meta.size, dtype=meta.properties.dtype) for name, meta in metadata.items()
             if name.startswith(PREFIX) and name.endswith("weight") and hasattr(meta, "size")}
    dcp.load(state, storage_reader=reader)
    return state


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", type=Path, required=True, help="the run's checkpoint directory (--save)")
    parser.add_argument("--iterations", type=int, nargs=2, required=True, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--lr", type=float, required=True, help="the learning rate of the step(s) between them")
    args = parser.parse_args(argv)
    directories = [args.load / f"iter_{iteration:07d}" for iteration in args.iterations]
    for flag, directory in zip(("BEFORE", "AFTER"), directories):
        if not (directory / ".metadata").is_file():
            parser.error(f"--iterations {flag}: no torch_dist checkpoint at {directory}")
    before, after = map(layer_weights, directories)
    print(f"largest |update| / LR per layer, iterations {args.iterations[0]} -> {args.iterations[1]}")
    for name in sorted(before):
        moved = ((after[name].float() - before[name].float()).abs().flatten(1).amax(1) / args.lr).tolist()
        print(f"  {name[len(PREFIX):]:<45}" + "".join(f"  layer {i + 1}: {m:5.2f}" for i, m in enumerate(moved)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
