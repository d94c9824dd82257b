"""Is skipping free? Step time of a RaPTr path of k of L layers vs a dense k-layer model.

Both models train side by side in one process, steps interleaved so machine noise
hits both alike; prints the median step times and their ratio (goal: <= 1.02).
With --full the dense L-layer model trains alongside too, giving the share of the
skipped layers' time that skipping saves. Under torchrun with several processes the
models are data-parallel (tools/bench_dp.py compares that share across DP sizes);
--megatron-args passes pretrain_raptr.py flags such as --use-distributed-optimizer.
The forward+backward ratio is printed apart from the whole step, because the
optimizer still updates the L - k idle layers (with zero gradients). On a GPU every
timing is bracketed by torch.cuda.synchronize(), and model TFLOP/s (active layers
only), MFU and peak memory are reported too; --json writes all figures.

    python tools/bench_skip.py --layers 12 --path 4 --hidden-size 256
    python tools/bench_skip.py --layers 24 --path 12 --hidden-size 2048 --seq-length 2048 --bf16
"""

import argparse
import json
import os
import statistics
import time

import torch
from megatron.core import parallel_state

from megatron_raptr.training import data
from megatron_raptr.training.arguments import parse_args
from megatron_raptr.training.initialize import initialize_distributed
from megatron_raptr.training.loop import build_trainer

# Dense bf16 tensor-core peaks (vendor datasheets, SXM parts), for MFU.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "B200": 2250.0}


def build(num_layers, common, raptr):
    args = parse_args(common + ["--num-layers", str(num_layers)] + raptr, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    trainer, tokenizer = build_trainer(args)
    train, _ = data.build_datasets(args, tokenizer)
    iterator = data.build_data_iterator(train, args.micro_batch_size, parallel_state.get_data_parallel_rank(),
                                        parallel_state.get_data_parallel_world_size(), consumed_samples=0)
    return trainer, iterator


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def peak_tflops(device_name):
    return next((peak for model, peak in PEAK_BF16_TFLOPS.items() if model in device_name), None)


def parse_bench_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--path", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--full", action="store_true", help="also time the dense model of all --layers")
    parser.add_argument("--megatron-args", default="", help="more pretrain_raptr.py flags for every model")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    bench = parser.parse_args(argv)
    if not 1 <= bench.path <= bench.layers:
        parser.error(f"--path {bench.path} must be between 1 and --layers {bench.layers}")
    return bench


def run(bench):
    common = (f"--hidden-size {bench.hidden_size} --num-attention-heads {bench.hidden_size // 64} "
              f"--seq-length {bench.seq_length} --micro-batch-size {bench.micro_batch_size} "
              f"--train-iters {2 * bench.steps + 4} --lr 1e-4 --hidden-dropout 0 --attention-dropout 0 "
              f"--mock-data --tokenizer-type NullTokenizer --vocab-size {bench.vocab_size} --eval-iters 0"
              ).split() + (["--bf16"] if bench.bf16 else []) + bench.megatron_args.split()
    initialize_distributed(1, 1, seed=1234)
    raptr = ["--raptr-schedule", f"{bench.path}@0", "--raptr-sampling", "fixed-size", "--raptr-fixed-layers"]
    runs = {
        "raptr": build(bench.layers, common, raptr),
        "dense": build(bench.path, common, []),
    }
    if bench.full:
        runs["full"] = build(bench.layers, common, [])
    cuda = torch.cuda.is_available()
    times = {name: {"step": [], "forward_backward": []} for name in runs}
    peak_bytes, step_bytes = dict.fromkeys(runs, 0), dict.fromkeys(runs, 0)
    for step in range(bench.steps + 2):
        for name, (trainer, iterator) in runs.items():
            trainer.runtime.start(step)
            kwargs = trainer.schedule_kwargs(iterator, forward_only=False)
            for chunk in trainer.model:
                chunk.zero_grad_buffer()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()
            fb = timed(lambda: trainer.forward_backward(**kwargs))
            opt = timed(trainer.optimizer.step)
            if cuda:
                peak_bytes[name] = max(peak_bytes[name], torch.cuda.max_memory_allocated())
                step_bytes[name] = max(step_bytes[name], torch.cuda.max_memory_allocated() - resident)
            if step >= 2:  # warm-up steps excluded
                times[name]["forward_backward"].append(fb)
                times[name]["step"].append(fb + opt)

    device = torch.cuda.get_device_name() if cuda else "cpu"
    peak = peak_tflops(device) if cuda and bench.bf16 else None
    result = {"device": device, "dtype": "bf16" if bench.bf16 else "fp32", "layers": bench.layers,
              "data_parallel_size": parallel_state.get_data_parallel_world_size(),
              "megatron_args": bench.megatron_args, "path": bench.path, "hidden_size": bench.hidden_size, "seq_length": bench.seq_length,
              "micro_batch_size": bench.micro_batch_size, "steps": bench.steps, "peak_tflops": peak}
    for name, (trainer, _) in runs.items():
        # Model FLOPs of the active layers: the same for both models by construction.
        flops = trainer.runtime.flops(bench.path)
        step_s = statistics.median(times[name]["step"])
        tflops = flops / step_s / 1e12
        result[name] = {
            "forward_backward_ms": 1000 * statistics.median(times[name]["forward_backward"]),
            "step_ms": 1000 * step_s,
            "model_tflops": tflops,
            "mfu": None if peak is None else tflops / peak,
            # Both models live in the process: the peak holds both; the step's own share apart.
            "peak_memory_gib": peak_bytes[name] / 2**30 if cuda else None,
            "step_memory_gib": step_bytes[name] / 2**30 if cuda else None,
        }
    for part in ("forward_backward", "step"):
        result[f"{part}_ratio"] = result["raptr"][f"{part}_ms"] / result["dense"][f"{part}_ms"]
        if bench.full:
            full, raptr, dense = (result[name][f"{part}_ms"] for name in ("full", "raptr", "dense"))
            # 1: the skipped layers cost nothing; 0: skipping saved nothing.
            result[f"{part}_saved_share"] = (full - raptr) / (full - dense)
    return result


def report(result):
    """A short text table of run()'s figures."""
    lines = [f"{result['device']}, {result['dtype']}, DP={result['data_parallel_size']}: path {result['path']} of "
             f"{result['layers']} layers vs a dense {result['path']}-layer model, hidden {result['hidden_size']}, "
             f"{result['micro_batch_size']} x {result['seq_length']} tokens, median of {result['steps']} steps",
             f"  {'':8s} {'fwd+bwd ms':>11s} {'step ms':>9s} {'TFLOP/s':>9s} {'MFU':>6s} {'peak GiB':>9s} {'step GiB':>9s}"]
    for name in ("raptr", "dense", "full"):
        if name not in result:
            continue
        r = result[name]
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.3f}"
        memory = " ".join("        -" if r[key] is None else f"{r[key]:9.1f}"
                          for key in ("peak_memory_gib", "step_memory_gib"))
        lines.append(f"  {name:8s} {r['forward_backward_ms']:11.1f} {r['step_ms']:9.1f} {r['model_tflops']:9.2f} "
                     f"{mfu:>6s} {memory}")
    lines.append(f"  ratio raptr/dense: forward+backward {result['forward_backward_ratio']:.3f}, "
                 f"whole step {result['step_ratio']:.3f}   (torch threads {torch.get_num_threads()})")
    if "step_saved_share" in result:
        lines.append(f"  share of the skipped layers' time saved: forward+backward "
                     f"{result['forward_backward_saved_share']:.2f}, whole step {result['step_saved_share']:.2f}")
    return "\n".join(lines)


def main(argv=None):
    bench = parse_bench_args(argv)
    result = run(bench)
    if torch.distributed.get_rank():
        return  # every rank waited for the same collectives: rank 0's times speak for all
    print(report(result), flush=True)
    if bench.json:
        with open(bench.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
