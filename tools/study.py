"""Loss versus compute: RaPTr against the full model, the full model trained on RaPTr's FLOPs,
gradual stacking and progressive layer dropping; same data, model, LR schedule family and data
order, several seeds, on the real corpus of tools/fetch_corpus.py.

    python tools/study.py --preset smoke --output-dir runs/study-smoke
    python tools/study.py --preset cpu --output-dir runs/study-cpu        # the README's figures
    python tools/study.py --preset cpu --iters 100 400 --methods baseline raptr baseline-equal-flops \
        --variant "scaling-none=--raptr-scaling none" --jobs 2 --output-dir runs/study-scaling

``--iters`` takes several training budgets; ``--variant NAME=FLAGS`` adds RaPTr runs with FLAGS
after the ``raptr`` run's flags (the equal-FLOPs baseline spends the ``raptr`` run's FLOPs).
Writes DIR/results.json ({"runs": [...]}), DIR/results.md, DIR/loss_vs_flops.png,
DIR/loss_vs_time.png and DIR/stage_boundaries.png; each run's metrics, log and checkpoint
under DIR/runs/METHOD-ITERSit-sSEED/. Rerunning skips finished runs and resumes interrupted ones.
After training, every run's final checkpoint is evaluated (pretrain_raptr.py --skip-train) on the
mixed validation set and on each corpus source's held-out documents separately (--no-source-eval:
not).
"""

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import plot_metrics

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("baseline", "raptr", "baseline-equal-flops", "stacking", "pld")


@dataclasses.dataclass(frozen=True)
class Preset:
    layers: int
    hidden: int
    heads: int
    seq: int
    micro_batch: int
    global_batch: int
    iters: int
    seeds: Sequence[int]
    nproc: int
    vocab: int
    eval_interval: int
    eval_iters: int
    lr: float
    bf16: bool = False
    family: str = "gpt"  # --model
    adam_beta2: float = 0.95

    def model(self) -> dict:
        return {"model": self.family, "num_layers": self.layers, "hidden_size": self.hidden, "num_attention_heads": self.heads,
                "seq_length": self.seq, "global_batch_size": self.global_batch, "train_iters": self.iters,
                "vocab_size": self.vocab}


PRESETS = {
    # Minutes on a 2-core machine: every method, one seed, a tiny model.
    "smoke": Preset(layers=6, hidden=64, heads=2, seq=64, micro_batch=4, global_batch=8, iters=40, seeds=(1,),
                    nproc=1, vocab=1000, eval_interval=10, eval_iters=4, lr=2e-3),
    # The README's figures: about an hour on a 2-core machine.
    "cpu": Preset(layers=12, hidden=128, heads=2, seq=128, micro_batch=8, global_batch=16, iters=160,
                  seeds=(1, 2, 3), nproc=1, vocab=8000, eval_interval=20, eval_iters=8, lr=1e-3),
    # RaPTr's defaults (README "RaPTr's defaults"): the cpu model on half the batch, so that 3 seeds
    # of many variants at two budgets (--iters 100 400) fit in about an hour.
    "defaults-cpu": Preset(layers=12, hidden=128, heads=2, seq=128, micro_batch=8, global_batch=8, iters=100,
                           seeds=(1, 2, 3), nproc=1, vocab=8000, eval_interval=25, eval_iters=8, lr=1e-3),
    # One 8-GPU node: GPT-2 small (124M) on ~1B tokens.
    "gpu-node": Preset(layers=12, hidden=768, heads=12, seq=1024, micro_batch=16, global_batch=256, iters=4000,
                       seeds=(1, 2, 3), nproc=8, vocab=32000, eval_interval=250, eval_iters=20, lr=6e-4,
                       bf16=True),
    # BERT (masked-LM) on the same corpus, split into sentences; RaPTr's shape is then the
    # paper's BERT schedule (6-8-10-12 for 12 layers).
    "bert-cpu": Preset(layers=12, hidden=128, heads=2, seq=128, micro_batch=8, global_batch=16, iters=160,
                       seeds=(1, 2, 3), nproc=1, vocab=8000, eval_interval=20, eval_iters=8, lr=1e-3,
                       family="bert"),
    # The paper's BERT-base on one 8-GPU node.
    "bert-gpu-node": Preset(layers=12, hidden=768, heads=12, seq=128, micro_batch=32, global_batch=256,
                            iters=20000, seeds=(1, 2, 3), nproc=8, vocab=32000, eval_interval=1000,
                            eval_iters=20, lr=1e-4, bf16=True, family="bert"),
}


def method_flags(method: str, preset: Preset) -> List[str]:
    """The command-line flags of a method for this model depth."""
    L = preset.layers
    if method == "raptr":  # the paper's shape: L/2, 2L/3, 5L/6, L in four equal stages
        return ["--raptr-schedule", f"{L // 2}@0,{2 * L // 3}@0.25,{5 * L // 6}@0.5,{L}@0.75"]
    if method == "stacking":  # Reddi et al.: L/2 -> 3L/4 -> L in three equal stages
        return ["--stacking-schedule", f"{L // 2}@0,{3 * L // 4}@0.33,{L}@0.67"]
    if method == "pld":
        # Zhang and He: theta-bar 0.5; their gamma 0.001 over ~200k steps reaches theta-bar in the first
        # ~2.5% of training; scaled so that holds for this run length.
        return ["--pld-theta", "0.5", "--pld-gamma", f"{0.001 * 200_000 / preset.iters:.6g}"]
    return []


def data_flags(data: Dict[str, str]) -> List[str]:
    return ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", data["tokenizer"],
            "--train-data-path", data["train"], "--valid-data-path", data["valid"]]


def eval_interval(preset: Preset, iters: int) -> int:
    """Evaluations (and checkpoints) as often, relative to the run's length, as the preset's at its own."""
    return max(1, round(preset.eval_interval * iters / preset.iters))


def common_flags(preset: Preset, iters: int) -> List[str]:
    flags = [
        "--num-layers", preset.layers, "--hidden-size", preset.hidden, "--num-attention-heads", preset.heads,
        "--seq-length", preset.seq, "--micro-batch-size", preset.micro_batch,
        "--global-batch-size", preset.global_batch, "--train-iters", iters,
        "--lr", preset.lr, "--min-lr", preset.lr / 10, "--lr-decay-style", "cosine",
        "--lr-warmup-iters", max(1, iters // 10), "--weight-decay", 0.1, "--adam-beta2", preset.adam_beta2,
        "--hidden-dropout", 0, "--attention-dropout", 0,
        "--eval-interval", eval_interval(preset, iters), "--eval-iters", preset.eval_iters,
        "--log-interval", eval_interval(preset, iters),
    ]
    return [str(f) for f in flags] + (["--bf16"] if preset.bf16 else []) + ["--model", preset.family]


def launch(preset: Preset, argv: List[str], log: Path, jobs: int) -> None:
    # --standalone picks a free port, so runs launched side by side (--jobs) do not collide.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(preset.nproc), str(ROOT / "pretrain_raptr.py"), *argv]
    threads = max(1, (os.cpu_count() or 1) // (preset.nproc * jobs))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with open(log, "a") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        if subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env).returncode:
            raise RuntimeError(f"run failed; see {log}")


def prepare_data(preset: Preset, corpus_dir: Path, data_dir: Path) -> Dict[str, str]:
    """Tokenizer and indexed datasets: the mixed train/valid sets and each source's valid documents."""
    if not (corpus_dir / "corpus.json").exists():
        run_tool("fetch_corpus.py", "--output-dir", corpus_dir)
    tokenizer = data_dir / f"spm{preset.vocab}"
    if not Path(f"{tokenizer}.model").exists():
        run_tool("train_tokenizer.py", "--input", corpus_dir / "train.jsonl", "--output-prefix", tokenizer,
                 "--vocab-size", preset.vocab)
    sources: Dict[str, List[str]] = {}
    with open(corpus_dir / "valid.jsonl") as f:
        for line in f:
            sources.setdefault(json.loads(line)["source"], []).append(line)
    inputs = {"train": corpus_dir / "train.jsonl", "valid": corpus_dir / "valid.jsonl"}
    for source, lines in sorted(sources.items()):
        inputs[f"valid_{source}"] = data_dir / f"valid_{source}.jsonl"
        if not inputs[f"valid_{source}"].exists():
            inputs[f"valid_{source}"].write_text("".join(lines))
    data = {"tokenizer": f"{tokenizer}.model"}
    # GPT reads documents ended by EOD; BERT reads runs of sentences.
    document = "--split-sentences" if preset.family == "bert" else "--append-eod"
    for name, jsonl in inputs.items():
        prefix = data_dir / preset.family / name
        if not Path(f"{prefix}_text_document.idx").exists():
            run_tool("preprocess_data.py", "--input", jsonl, "--output-prefix", prefix, "--tokenizer-type",
                     "SentencePieceTokenizer", "--tokenizer-model", data["tokenizer"], document)
        data[name] = f"{prefix}_text_document"
    return data


def run_tool(name: str, *argv) -> None:
    subprocess.run([sys.executable, str(ROOT / "tools" / name), *map(str, argv)], cwd=ROOT, check=True)


@dataclasses.dataclass(frozen=True)
class Run:
    method: str  # a METHODS entry or a --variant name
    seed: int
    iters: int
    flags: Tuple[str, ...]
    budget: int  # the --iters it is compared within (the equal-FLOPs baseline trains fewer)

    @property
    def name(self) -> str:
        return f"{self.method}-{self.iters}it-s{self.seed}"


def train_and_evaluate(preset: Preset, data: Dict[str, str], run: Run, run_dir: Path, jobs: int,
                       source_eval: bool) -> dict:
    """One run (resumed if interrupted), then --skip-train evaluation of its final checkpoint."""
    result_file = run_dir / "result.json"
    if result_file.exists():
        result = json.loads(result_file.read_text())
        if result["flags"] != list(run.flags):
            raise RuntimeError(f"{run_dir} holds a run with flags {result['flags']}, not {list(run.flags)}: "
                               "give the variant another name or another --output-dir")
        return result
    run_dir.mkdir(parents=True, exist_ok=True)
    common = common_flags(preset, run.iters) + data_flags(data) + [
        "--seed", str(run.seed), "--data-cache-path", str(run_dir.parent / "data_cache")]
    checkpoint = ["--save", str(run_dir / "ckpt"), "--load", str(run_dir / "ckpt")]
    launch(preset, common + list(run.flags) + checkpoint + [
        "--save-interval", str(eval_interval(preset, run.iters)),
        "--metrics-file", str(run_dir / "metrics.jsonl")], run_dir / "train.log", jobs)
    metrics = plot_metrics.read_metrics(run_dir / "metrics.jsonl")
    by_source = {}
    if source_eval:
        sources = [prefix for name, prefix in sorted(data.items()) if name.startswith("valid_")]
        at = common.index("--valid-data-path")
        evaluation = common[:at] + ["--valid-data-path", data["valid"], *sources] + common[at + 2:] + checkpoint + [
            "--skip-train", "--multiple-validation-sets", "--metrics-file", str(run_dir / "eval.jsonl")]
        (run_dir / "eval.jsonl").unlink(missing_ok=True)
        launch(preset, evaluation, run_dir / "eval.log", jobs)
        by_source = {json.loads(line)["valid_set"]: json.loads(line)["val_loss"]
                     for line in (run_dir / "eval.jsonl").read_text().splitlines()}
    result = {
        "method": run.method, "seed": run.seed, "iterations": run.iters, "flags": list(run.flags),
        "model": preset.model(),
        "final_val_loss": metrics["eval"][-1]["val_loss"],
        "total_flops": metrics["train"][-1]["cumulative_flops"],
        "wall_s": metrics["train"][-1]["elapsed_s"],
        "val_loss_by_source": by_source,
    }
    result_file.write_text(json.dumps(result, indent=1))
    return result


def first_reaching(metrics: Dict[str, List[dict]], target: float, x: str) -> Optional[float]:
    """Cumulative FLOPs or training time (x: "flops", "time") at the first evaluation whose loss is <= target."""
    return next((at for at, loss in plot_metrics.eval_points(metrics, x) if loss <= target), None)


def summarize(runs: List[dict], runs_dir: Path) -> List[dict]:
    """Adds flops_to_baseline_loss and time_to_baseline_loss (against the same seed's and budget's
    baseline), and delta_vs_equal_flops (the final loss minus the equal-FLOPs baseline's)."""
    baseline, equal = ({(r["seed"], r["budget"]): r for r in runs if r["method"] == method}
                       for method in ("baseline", "baseline-equal-flops"))
    for run in runs:
        metrics = plot_metrics.read_metrics(runs_dir / run["name"] / "metrics.jsonl")
        target = baseline.get((run["seed"], run["budget"]), {}).get("final_val_loss")
        run["flops_to_baseline_loss"] = None if target is None else first_reaching(metrics, target, "flops")
        run["time_to_baseline_loss"] = None if target is None else first_reaching(metrics, target, "time")
        reference = equal.get((run["seed"], run["budget"]))
        run["delta_vs_equal_flops"] = None if reference is None else run["final_val_loss"] - reference["final_val_loss"]
    return runs


def mean_spread(values: List[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def markdown(runs: List[dict], preset_name: str, methods: List[str]) -> str:
    sources = sorted({name for r in runs for name in r["val_loss_by_source"]})
    lines = [f"Preset `{preset_name}`: {json.dumps(runs[0]['model'])}. Mean ± standard deviation over seeds; "
             "FLOPs relative to the full-model baseline of the same budget; 'vs equal FLOPs': the final loss "
             "minus the same seed's equal-FLOPs baseline's (mean ± standard deviation; runs below it / runs); "
             "'to baseline loss': the FLOPs and training time at the first evaluation that reached the same "
             "seed's baseline final validation loss (runs that reached it / runs).", ""]
    for budget in sorted({r["budget"] for r in runs}):
        full = statistics.mean([r["total_flops"] for r in runs if r["method"] == "baseline" and r["budget"] == budget]
                               or [math.nan])
        lines += [f"**{budget} iterations**", "",
                  "| " + " | ".join(["method", "seeds", "final val loss", "vs equal FLOPs", "FLOPs", "wall s",
                                     "FLOPs to baseline loss", "time to baseline loss (s)",
                                     *(f"val {s}" for s in sources)]) + " |",
                  "|---" * (8 + len(sources)) + "|"]
        for method in methods:
            group = [r for r in runs if r["method"] == method and r["budget"] == budget]
            if not group:
                continue
            reached = [r for r in group if r["flops_to_baseline_loss"] is not None]
            deltas = [r["delta_vs_equal_flops"] for r in group if r["delta_vs_equal_flops"] is not None]
            lines.append(" | ".join([
                f"| {method}", str(len(group)), mean_spread([r["final_val_loss"] for r in group]),
                f"{mean_spread(deltas)} ({sum(d < 0 for d in deltas)}/{len(deltas)})"
                if deltas and method != "baseline-equal-flops" else "-",
                f"{statistics.mean(r['total_flops'] for r in group) / full:.3f}",
                f"{statistics.mean(r['wall_s'] for r in group):.0f}",
                f"{statistics.mean(r['flops_to_baseline_loss'] for r in reached) / full:.3f} "
                f"({len(reached)}/{len(group)})" if reached else f"never (0/{len(group)})",
                f"{statistics.mean(r['time_to_baseline_loss'] for r in reached):.0f}" if reached else "-",
                *[mean_spread([r["val_loss_by_source"][s] for r in group if s in r["val_loss_by_source"]])
                  for s in sources]]) + " |")
        lines.append("")
    return "\n".join(lines)


def parse_variant(text: str) -> Tuple[str, Tuple[str, ...]]:
    name, equals, flags = text.partition("=")
    if not equals or not name or name in METHODS or "/" in name:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME=FLAGS with a NAME that is not one of "
                                         f"{METHODS}")
    return name, tuple(shlex.split(flags))


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--variant", action="append", type=parse_variant, default=[], metavar="NAME=FLAGS",
                        help="a RaPTr run with FLAGS after the raptr method's flags (repeatable)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the preset's")
    parser.add_argument("--corpus-dir", default="data/corpus", help="tools/fetch_corpus.py output (fetched if absent)")
    parser.add_argument("--iters", nargs="+", type=int, default=None,
                        help="training budgets: --train-iters of each (default: the preset's)")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side, sharing the CPU cores")
    parser.add_argument("--adam-beta2", type=float, default=None, help="for every run (default: 0.95)")
    parser.add_argument("--source-eval", action=argparse.BooleanOptionalAction, default=True,
                        help="evaluate every final checkpoint on each corpus source too")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    budgets = args.iters or [preset.iters]
    preset = dataclasses.replace(preset, seeds=tuple(args.seeds or preset.seeds),
                                 adam_beta2=args.adam_beta2 or preset.adam_beta2)
    if "baseline-equal-flops" in args.methods and not {"baseline", "raptr"} <= set(args.methods):
        parser.error("--methods: baseline-equal-flops needs baseline and raptr (it spends RaPTr's FLOPs)")
    if args.variant and "raptr" not in args.methods:
        parser.error("--variant: variants change the raptr method's flags; --methods needs raptr")
    if len({name for name, _ in args.variant}) != len(args.variant):
        parser.error("--variant: two variants share a name")
    if min(budgets) < 1 or args.jobs < 1:
        parser.error("--iters and --jobs need positive numbers")
    out = Path(args.output_dir).resolve()
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(preset, Path(args.corpus_dir).resolve(), data_dir)

    methods = [m for m in METHODS if m in args.methods and m != "baseline-equal-flops"]
    def flags(method: str, iters: int) -> Tuple[str, ...]:
        return tuple(method_flags(method, dataclasses.replace(preset, iters=iters)))

    planned = [Run(method, seed, iters, flags(method, iters), iters)
               for iters in budgets for seed in preset.seeds for method in methods]
    planned += [Run(name, seed, iters, flags("raptr", iters) + extra, iters)
                for iters in budgets for seed in preset.seeds for name, extra in args.variant]
    runs_dir = out / "runs"

    def execute(run: Run) -> dict:
        sys.stdout.write(f"study: {run.method}, seed {run.seed}, {run.iters} iterations\n")
        sys.stdout.flush()
        result = train_and_evaluate(preset, data, run, runs_dir / run.name, args.jobs, args.source_eval)
        return dict(result, name=run.name, budget=run.budget)

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(execute, planned))
        if "baseline-equal-flops" in args.methods:  # as many full-model steps as RaPTr's FLOPs buy
            done = {(r["method"], r["seed"], r["budget"]): r for r in runs}
            equal = []
            for iters in budgets:
                for seed in preset.seeds:
                    per_step = done["baseline", seed, iters]["total_flops"] / iters
                    steps = max(1, int(done["raptr", seed, iters]["total_flops"] / per_step))
                    equal.append(Run("baseline-equal-flops", seed, steps, (), iters))
            runs += list(pool.map(execute, equal))

    names = [m for m in METHODS if m in args.methods] + [name for name, _ in args.variant]
    runs.sort(key=lambda r: (r["budget"], r["seed"], names.index(r["method"])))
    runs = summarize(runs, runs_dir)
    (out / "results.json").write_text(json.dumps({"preset": args.preset, "runs": runs}, indent=1))
    (out / "results.md").write_text(markdown(runs, args.preset, names))
    seed, budget = preset.seeds[0], max(budgets)
    first = {r["method"]: plot_metrics.read_metrics(runs_dir / r["name"] / "metrics.jsonl")
             for r in runs if r["seed"] == seed and r["budget"] == budget}
    title = f"{args.preset}: seed {seed}, {budget} iterations"
    plot_metrics.plot(first, out / "loss_vs_flops.png", "flops", title, train_loss=False)
    plot_metrics.plot(first, out / "loss_vs_time.png", "time", title, train_loss=False)
    plot_metrics.plot({m: first[m] for m in ("baseline", "raptr", "stacking") if m in first},
                      out / "stage_boundaries.png", "iterations", "training loss around stage boundaries")
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
