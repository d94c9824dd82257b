"""Pipeline balance: how evenly does a path load the pipeline stages?

A pipeline step takes as long as its slowest stage, so a path of k layers that puts more of them
on one stage wastes the others' time. Prints, side by side:

- measured, PP=2 on 2 processes (optionally with virtual stages: the interleaved schedule): step
  time of `fixed-size` versus `pipeline-balanced` sampling at the same path length, with the
  ratio the FLOPs predict (layers on the slowest pipeline rank);
- analytic, from the sampler itself: expected layers on the slowest pipeline rank per step for
  PP=2, 4 and 8, without and with 2 and 4 virtual stages, under each sampling mode, and the
  pipeline efficiency that leaves (k/PP over it).

    torchrun --nproc-per-node 2 tools/bench_pipeline.py --layers 8 --path 4 [--virtual-stages 2]
    python tools/bench_pipeline.py --analytic-only --json pipeline.json
"""

import argparse
import json
import os
import statistics
import time

import numpy as np

from megatron_raptr.layout import PipelineLayout, pipeline_layout
from megatron_raptr.sampler import PathSampler
from megatron_raptr.schedule import RaptrSchedule

MODES = ("bernoulli", "fixed-size", "pipeline-balanced")
ANALYTIC_LAYERS = 32


def slowest_stage_layers(layers: int, path: int, stages: int, mode: str, virtual_stages: int = 1,
                         steps: int = 2000) -> float:
    """Mean over steps of the most path layers any one pipeline rank runs (first and last layer fixed)."""
    schedule = RaptrSchedule.parse(f"{path}@0", layers, train_iters=steps, sampling=mode)
    layout = PipelineLayout.even(layers, stages, virtual_stages)
    sampler = PathSampler(schedule, seed=0, layout=layout)
    rank_of = [layout.rank_of(layer) for layer in range(1, layers + 1)]
    loads = [np.bincount([rank_of[layer - 1] for layer in sampler.path(t).active], minlength=stages).max()
             for t in range(steps)]
    return float(np.mean(loads))


def analytic_loads(layers: int = ANALYTIC_LAYERS) -> list:
    """Expected layers on the slowest pipeline rank per step of each sampling mode, for PP=2, 4, 8 without
    and with virtual stages, and three path lengths."""
    return [{"pp": stages, "vp": virtual_stages, "path": path,
             "slowest_stage_layers": {mode: slowest_stage_layers(layers, path, stages, mode, virtual_stages)
                                      for mode in MODES}}
            for stages in (2, 4, 8) for virtual_stages in ((1, 2, 4) if stages > 2 else (1, 2))
            for path in (layers // 2, 2 * layers // 3, 5 * layers // 6)]


def analytic_table(loads: list, layers: int = ANALYTIC_LAYERS) -> str:
    lines = [f"expected layers on the slowest pipeline rank per step ({layers} layers, first and last fixed; "
             f"efficiency = path/PP over it; VP: virtual stages per rank)",
             f"  {'PP':>3s} {'VP':>3s} {'path':>5s} " + " ".join(f"{mode:>24s}" for mode in MODES)]
    for row in loads:
        cells = [f"{load:8.2f} (eff. {row['path'] / row['pp'] / load:4.2f})"
                 for load in row["slowest_stage_layers"].values()]
        lines.append(f"  {row['pp']:3d} {row['vp']:3d} {row['path']:5d} " + " ".join(f"{cell:>24s}" for cell in cells))
    return "\n".join(lines)


def measure(layers: int, path: int, hidden: int, seq: int, micro_batch: int, microbatches: int, steps: int,
            virtual_stages: int = 1) -> dict:
    """Median step time of each mode on this PP=2 job (every rank returns the same figures)."""
    import torch
    import torch.distributed as dist

    from megatron_raptr.training import data
    from megatron_raptr.training.arguments import parse_args
    from megatron_raptr.training.initialize import initialize_distributed
    from megatron_raptr.training.loop import build_trainer
    from megatron_raptr.training.model import transformer_config

    initialize_distributed(1, 2, seed=1234, virtual_pipeline_model_parallel_size=virtual_stages if virtual_stages > 1
                           else None)
    common = (f"--num-layers {layers} --hidden-size {hidden} --num-attention-heads {max(1, hidden // 64)} "
              f"--seq-length {seq} --micro-batch-size {micro_batch} --global-batch-size {micro_batch * microbatches} "
              f"--train-iters {steps + 2} --lr 1e-4 --hidden-dropout 0 --attention-dropout 0 --mock-data "
              f"--tokenizer-type NullTokenizer --vocab-size 1000 --eval-iters 0 --pipeline-model-parallel-size 2 "
              f"--raptr-schedule {path}@0 --num-virtual-stages-per-pipeline-rank {virtual_stages}").split()
    layout = pipeline_layout(transformer_config(parse_args(common, world_size=dist.get_world_size())))
    runs = {}
    for mode in ("fixed-size", "pipeline-balanced"):
        args = parse_args(common + ["--raptr-sampling", mode], world_size=dist.get_world_size())
        trainer, tokenizer = build_trainer(args)
        train, _ = data.build_datasets(args, tokenizer)
        runs[mode] = (trainer, data.build_data_iterator(train, micro_batch, 0, 1, consumed_samples=0))
    times = {mode: [] for mode in runs}
    loads = {mode: [] for mode in runs}
    for step in range(steps + 2):
        for mode, (trainer, iterator) in runs.items():
            active = trainer.runtime.start(step).active
            for chunk in trainer.model:
                chunk.zero_grad_buffer()
            dist.barrier()
            start = time.perf_counter()
            trainer.forward_backward(**trainer.schedule_kwargs(iterator, forward_only=False))
            trainer.optimizer.step()
            elapsed = torch.tensor(time.perf_counter() - start)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step ends when its last rank does
            if step >= 2:
                times[mode].append(elapsed.item())
                ranks = [layout.rank_of(layer) for layer in active]
                loads[mode].append(max(ranks.count(0), ranks.count(1)))
    return {mode: {"step_ms": 1000 * statistics.median(times[mode]), "slowest_stage_layers": statistics.mean(loads[mode])}
            for mode in runs}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--path", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=8, help="per step, so the pipeline fills")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--virtual-stages", type=int, default=1, help="per pipeline rank (the interleaved schedule)")
    parser.add_argument("--analytic-only", action="store_true")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    bench = parser.parse_args()
    if not bench.analytic_only:
        if os.environ.get("WORLD_SIZE") != "2":
            parser.error("the measured part needs 2 processes: torchrun --nproc-per-node 2 tools/bench_pipeline.py "
                         "(or --analytic-only)")
        result = measure(bench.layers, bench.path, bench.hidden_size, bench.seq_length, bench.micro_batch_size,
                         bench.microbatches, bench.steps, bench.virtual_stages)
        if int(os.environ["RANK"]) == 0:
            fixed, balanced = result["fixed-size"], result["pipeline-balanced"]
            print(f"PP=2, {bench.virtual_stages} virtual stage(s) per rank, path {bench.path} of {bench.layers} layers, hidden {bench.hidden_size}, "
                  f"{bench.microbatches} x {bench.micro_batch_size} x {bench.seq_length} tokens, median of {bench.steps} steps")
            for mode, r in result.items():
                print(f"  {mode:18s} step {r['step_ms']:8.1f} ms   layers on the slowest rank {r['slowest_stage_layers']:.2f}")
            print(f"  fixed-size / pipeline-balanced: measured {fixed['step_ms'] / balanced['step_ms']:.3f}, "
                  f"FLOPs ideal {fixed['slowest_stage_layers'] / balanced['slowest_stage_layers']:.3f}", flush=True)
    if bench.analytic_only or int(os.environ.get("RANK", "0")) == 0:
        loads = analytic_loads()
        print(analytic_table(loads), flush=True)
        if bench.json:
            with open(bench.json, "w") as f:
                measured = {} if bench.analytic_only else {"measured": result, "settings": vars(bench)}
                json.dump({"layers": ANALYTIC_LAYERS, "analytic": loads, **measured}, f, indent=1)


if __name__ == "__main__":
    main()
