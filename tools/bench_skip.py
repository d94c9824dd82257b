"""Is skipping free? Step time of a RaPTr path of k of L layers vs a dense k-layer model.

Both models train side by side in one process, steps interleaved so machine noise
hits both alike; prints the median step times and their ratio (goal: <= 1.02).
The forward+backward ratio is printed apart from the whole step, because the
optimizer still updates the L - k idle layers (with zero gradients).

    python tools/bench_skip.py --layers 12 --path 4 --hidden-size 256
"""

import argparse
import statistics
import time

import torch
from megatron.core import parallel_state

from megatron_raptr.training import data
from megatron_raptr.training.arguments import parse_args
from megatron_raptr.training.initialize import initialize_distributed
from megatron_raptr.training.loop import Trainer
from megatron_raptr.training.model import build_model, build_optimizer, transformer_config
from megatron_raptr.training.tokenizer import build_tokenizer


def build(num_layers, common, raptr):
    args = parse_args(common + ["--num-layers", str(num_layers)] + raptr)
    config = transformer_config(args)
    tokenizer = build_tokenizer(args)
    model = build_model(args, config, tokenizer.vocab_size)
    optimizer, scheduler = build_optimizer(args, config, model)
    trainer = Trainer(args, config, model, optimizer, scheduler, tokenizer.vocab_size, hooks=[])
    train, _ = data.build_datasets(args, tokenizer)
    iterator = data.build_data_iterator(train, args.micro_batch_size, parallel_state.get_data_parallel_rank(),
                                        parallel_state.get_data_parallel_world_size(), consumed_samples=0)
    return trainer, iterator


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--path", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    bench = parser.parse_args()
    common = (f"--hidden-size {bench.hidden_size} --num-attention-heads {bench.hidden_size // 64} "
              f"--seq-length {bench.seq_length} --micro-batch-size {bench.micro_batch_size} "
              f"--train-iters {2 * bench.steps + 4} --lr 1e-4 --hidden-dropout 0 --attention-dropout 0 "
              "--mock-data --tokenizer-type NullTokenizer --vocab-size 8000 --eval-iters 0").split()
    initialize_distributed(1, 1, seed=1234)
    raptr = ["--raptr-schedule", f"{bench.path}@0", "--raptr-sampling", "fixed-size", "--raptr-fixed-layers"]
    runs = {
        "raptr": build(bench.layers, common, raptr),
        "dense": build(bench.path, common, []),
    }
    times = {name: {"step": [], "forward_backward": []} for name in runs}
    for step in range(bench.steps + 2):
        for name, (trainer, iterator) in runs.items():
            trainer.apply_path(step)
            kwargs = trainer.schedule_kwargs(iterator, forward_only=False)
            for chunk in trainer.model:
                chunk.zero_grad_buffer()
            fb = timed(lambda: trainer.forward_backward(**kwargs))
            opt = timed(trainer.optimizer.step)
            if step >= 2:  # warm-up steps excluded
                times[name]["forward_backward"].append(fb)
                times[name]["step"].append(fb + opt)
    print(f"path {bench.path} of {bench.layers} layers vs dense {bench.path} layers, hidden {bench.hidden_size}, "
          f"{bench.micro_batch_size} x {bench.seq_length} tokens, {bench.steps} steps, torch threads "
          f"{torch.get_num_threads()}")
    for part in ("forward_backward", "step"):
        dense = statistics.median(times["dense"][part])
        ours = statistics.median(times["raptr"][part])
        print(f"  {part:16s} raptr {ours * 1000:8.1f} ms  dense {dense * 1000:8.1f} ms  ratio {ours / dense:.3f}")


if __name__ == "__main__":
    main()
