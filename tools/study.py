"""Loss versus compute: RaPTr against the full model, the full model trained on RaPTr's FLOPs,
gradual stacking and progressive layer dropping; same data, model, LR schedule family and data
order, several seeds, on the real corpus of tools/fetch_corpus.py.

    python tools/study.py --preset smoke --output-dir runs/study-smoke
    python tools/study.py --preset cpu --output-dir runs/study-cpu        # the README's figures

Writes DIR/results.json ({"runs": [...]}), DIR/results.md, DIR/loss_vs_flops.png,
DIR/loss_vs_time.png and DIR/stage_boundaries.png; each run's metrics, log and checkpoint
under DIR/runs/METHOD-sSEED/. Rerunning skips finished runs and resumes interrupted ones.
After training, every run's final checkpoint is evaluated (pretrain_raptr.py --skip-train) on the
mixed validation set and on each corpus source's held-out documents separately.
"""

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

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


def common_flags(preset: Preset, iters: int) -> List[str]:
    flags = [
        "--num-layers", preset.layers, "--hidden-size", preset.hidden, "--num-attention-heads", preset.heads,
        "--seq-length", preset.seq, "--micro-batch-size", preset.micro_batch,
        "--global-batch-size", preset.global_batch, "--train-iters", iters,
        "--lr", preset.lr, "--min-lr", preset.lr / 10, "--lr-decay-style", "cosine",
        "--lr-warmup-iters", max(1, iters // 10), "--weight-decay", 0.1, "--adam-beta2", 0.95,
        "--hidden-dropout", 0, "--attention-dropout", 0,
        "--eval-interval", preset.eval_interval, "--eval-iters", preset.eval_iters,
        "--log-interval", preset.eval_interval,
    ]
    return [str(f) for f in flags] + (["--bf16"] if preset.bf16 else []) + ["--model", preset.family]


def launch(preset: Preset, argv: List[str], log: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(preset.nproc), str(ROOT / "pretrain_raptr.py"), *argv]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // preset.nproc)))
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


def train_and_evaluate(preset: Preset, data: Dict[str, str], method: str, seed: int, iters: int,
                       run_dir: Path) -> dict:
    """One run (resumed if interrupted), then --skip-train evaluation of its final checkpoint."""
    result_file = run_dir / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    flags = method_flags(method, preset)
    common = common_flags(preset, iters) + data_flags(data) + ["--seed", str(seed), "--data-cache-path",
                                                               str(run_dir.parent / "data_cache")]
    checkpoint = ["--save", str(run_dir / "ckpt"), "--load", str(run_dir / "ckpt")]
    launch(preset, common + flags + checkpoint + ["--save-interval", str(preset.eval_interval),
                                                  "--metrics-file", str(run_dir / "metrics.jsonl")],
           run_dir / "train.log")
    sources = [prefix for name, prefix in sorted(data.items()) if name.startswith("valid_")]
    evaluation = common[:common.index("--valid-data-path")] + ["--valid-data-path", data["valid"], *sources] + \
        common[common.index("--valid-data-path") + 2:] + checkpoint + [
            "--skip-train", "--multiple-validation-sets", "--metrics-file", str(run_dir / "eval.jsonl")]
    (run_dir / "eval.jsonl").unlink(missing_ok=True)
    launch(preset, evaluation, run_dir / "eval.log")
    metrics = plot_metrics.read_metrics(run_dir / "metrics.jsonl")
    by_source = {json.loads(line)["valid_set"]: json.loads(line)["val_loss"]
                 for line in (run_dir / "eval.jsonl").read_text().splitlines()}
    result = {
        "method": method, "seed": seed, "iterations": iters, "flags": flags, "model": preset.model(),
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


def summarize(runs: List[dict], run_dirs: Dict[tuple, Path]) -> List[dict]:
    """Adds flops_to_baseline_loss and time_to_baseline_loss (against the same seed's baseline)."""
    baseline = {r["seed"]: r["final_val_loss"] for r in runs if r["method"] == "baseline"}
    for run in runs:
        metrics = plot_metrics.read_metrics(run_dirs[run["method"], run["seed"]] / "metrics.jsonl")
        target = baseline.get(run["seed"])
        run["flops_to_baseline_loss"] = None if target is None else first_reaching(metrics, target, "flops")
        run["time_to_baseline_loss"] = None if target is None else first_reaching(metrics, target, "time")
    return runs


def mean_spread(values: List[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def markdown(runs: List[dict], preset_name: str) -> str:
    full = statistics.mean([r["total_flops"] for r in runs if r["method"] == "baseline"] or [math.nan])
    sources = sorted({name for r in runs for name in r["val_loss_by_source"]})
    lines = [f"Preset `{preset_name}`: {json.dumps(runs[0]['model'])}. Mean ± standard deviation over seeds; "
             "FLOPs relative to the full-model baseline; 'to baseline loss': the FLOPs and training time "
             "at the first evaluation that reached the same seed's baseline final validation loss "
             "(runs that reached it / runs).", "",
             "| method | seeds | final val loss | FLOPs | wall s | FLOPs to baseline loss | time to baseline loss (s) | "
             + " | ".join(f"val {s}" for s in sources) + " |",
             "|---" * (7 + len(sources)) + "|"]
    for method in METHODS:
        group = [r for r in runs if r["method"] == method]
        if not group:
            continue
        reached = [r for r in group if r["flops_to_baseline_loss"] is not None]
        lines.append(" | ".join([
            f"| {method}", str(len(group)), mean_spread([r["final_val_loss"] for r in group]),
            f"{statistics.mean(r['total_flops'] for r in group) / full:.3f}",
            f"{statistics.mean(r['wall_s'] for r in group):.0f}",
            f"{statistics.mean(r['flops_to_baseline_loss'] for r in reached) / full:.3f} ({len(reached)}/{len(group)})"
            if reached else f"never (0/{len(group)})",
            f"{statistics.mean(r['time_to_baseline_loss'] for r in reached):.0f}" if reached else "-",
            *[mean_spread([r["val_loss_by_source"][s] for r in group if s in r["val_loss_by_source"]])
              for s in sources]]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the preset's")
    parser.add_argument("--corpus-dir", default="data/corpus", help="tools/fetch_corpus.py output (fetched if absent)")
    parser.add_argument("--iters", type=int, default=None, help="override the preset's --train-iters")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    preset = dataclasses.replace(preset, seeds=tuple(args.seeds or preset.seeds), iters=args.iters or preset.iters)
    if "baseline-equal-flops" in args.methods and not {"baseline", "raptr"} <= set(args.methods):
        parser.error("--methods: baseline-equal-flops needs baseline and raptr (it spends RaPTr's FLOPs)")
    out = Path(args.output_dir).resolve()
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(preset, Path(args.corpus_dir).resolve(), data_dir)

    runs, run_dirs = [], {}
    for seed in preset.seeds:
        done = {}
        for method in [m for m in METHODS if m in args.methods]:
            iters = preset.iters
            if method == "baseline-equal-flops":  # as many full-model steps as RaPTr's FLOPs buy
                per_step = done["baseline"]["total_flops"] / preset.iters
                iters = max(1, int(done["raptr"]["total_flops"] / per_step))
            run_dirs[method, seed] = out / "runs" / f"{method}-s{seed}"
            print(f"study: {method}, seed {seed}, {iters} iterations", flush=True)
            done[method] = train_and_evaluate(preset, data, method, seed, iters, run_dirs[method, seed])
            runs.append(done[method])

    runs = summarize(runs, run_dirs)
    (out / "results.json").write_text(json.dumps({"preset": args.preset, "runs": runs}, indent=1))
    (out / "results.md").write_text(markdown(runs, args.preset))
    first_seed = {m: plot_metrics.read_metrics(run_dirs[m, preset.seeds[0]] / "metrics.jsonl")
                  for m in METHODS if (m, preset.seeds[0]) in run_dirs}
    plot_metrics.plot(first_seed, out / "loss_vs_flops.png", "flops", f"{args.preset}: seed {preset.seeds[0]}",
                      train_loss=False)
    plot_metrics.plot(first_seed, out / "loss_vs_time.png", "time", f"{args.preset}: seed {preset.seeds[0]}",
                      train_loss=False)
    plot_metrics.plot({m: first_seed[m] for m in ("baseline", "raptr", "stacking") if m in first_seed},
                      out / "stage_boundaries.png", "iterations", "training loss around stage boundaries")
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
