"""Loss versus compute: RaPTr against the full model, the full model trained on RaPTr's FLOPs,
gradual stacking and progressive layer dropping; same data, model, LR schedule family and data
order, several seeds, on the real corpus of tools/fetch_corpus.py.

    python tools/study.py --preset smoke --output-dir runs/study-smoke
    python tools/study.py --preset cpu --output-dir runs/study-cpu        # every method, an hour on 2 cores
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

The held-out protocol (examples/study_evidence_cpu.sh; README "Loss versus compute: the study"):
``--lrs`` sweeps every method's LR on ``--selection-seeds``, picks each one's LR there by the final
loss on valid.jsonl, runs ``--report-seeds`` at it and reports them on training documents carved out
of training (``--heldout-fraction``), which no choice sees. ``--dense-depths`` adds shallower dense
models (and the best dense model for each method's compute); ``--frontier`` adds auto:F and stacking
at F and the smallest F at which each reaches the full model's loss. Under the protocol a frontier point
runs at its family's chosen LR (auto:F at ``raptr``'s, stacking at F at ``stacking``'s): it varies only
how much compute the family spends, and sweeping it too would cost 3 x 2 runs per point.
"""

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's megatron_raptr, not an installed one

import fetch_corpus
import plot_metrics
from megatron_raptr.schedule import auto_stages, equal_stages

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
    lr_decay_style: str = "cosine"  # or WSD: constant after warmup, linear decay over the last WSD_DECAY_SHARE

    def settings(self) -> dict:
        return {name: getattr(self, name) for name in SETTINGS}

    def model(self) -> dict:
        return {"model": self.family, "num_layers": self.layers, "hidden_size": self.hidden, "num_attention_heads": self.heads,
                "seq_length": self.seq, "global_batch_size": self.global_batch, "train_iters": self.iters,
                "vocab_size": self.vocab}


# Every run's settings that no run name says: a finished run is reused only under the same.
SETTINGS = ("adam_beta2", "lr_decay_style")
# Runs that predate the record were trained under the defaults.
DEFAULT_SETTINGS = {field.name: field.default for field in dataclasses.fields(Preset) if field.name in SETTINGS}

PRESETS = {
    # Minutes on a 2-core machine: every method, one seed, a tiny model.
    "smoke": Preset(layers=6, hidden=64, heads=2, seq=64, micro_batch=4, global_batch=8, iters=40, seeds=(1,),
                    nproc=1, vocab=1000, eval_interval=10, eval_iters=4, lr=2e-3),
    # Every method in about an hour on a 2-core machine.
    "cpu": Preset(layers=12, hidden=128, heads=2, seq=128, micro_batch=8, global_batch=16, iters=160,
                  seeds=(1, 2, 3), nproc=1, vocab=8000, eval_interval=20, eval_iters=8, lr=1e-3),
    # RaPTr's defaults (README "RaPTr's defaults"): the cpu model on half the batch, so that 3 seeds
    # of many variants at two budgets (--iters 100 400) fit in about an hour.
    "defaults-cpu": Preset(layers=12, hidden=128, heads=2, seq=128, micro_batch=8, global_batch=8, iters=100,
                           seeds=(1, 2, 3), nproc=1, vocab=8000, eval_interval=25, eval_iters=8, lr=1e-3),
    # Narrow and long (examples/study_evidence_cpu.sh): where depth pays, so that 12 layers against
    # 6 and a FLOPs frontier mean something; hidden 64, 32 x 128 tokens a step, 3000 steps.
    "narrow-cpu": Preset(layers=12, hidden=64, heads=2, seq=128, micro_batch=8, global_batch=32, iters=3000,
                         seeds=(1, 2, 3), nproc=1, vocab=8000, eval_interval=250, eval_iters=8, lr=2e-3),
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


def stacking_stages(num_layers: int, fraction: float) -> str:
    """Gradual stacking that spends ``fraction`` of full training's layer FLOPs: L/4 -> L/2 -> L layers
    (rounded up; each growth at most doubles, as Gong et al.'s progressive stacking), the growing
    stages equally long, then the full model; one shape for every fraction down to about 0.4."""
    lengths = [math.ceil(num_layers / 4), math.ceil(num_layers / 2)]
    return equal_stages(num_layers, fraction, lengths, f"stacking {lengths[0]} -> {lengths[1]} -> {num_layers} layers",
                        "--stacking-schedule")


def data_flags(data: Dict[str, str]) -> List[str]:
    return ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", data["tokenizer"],
            "--train-data-path", data["train"], "--valid-data-path", data["valid"]]


def eval_interval(preset: Preset, iters: int) -> int:
    """Evaluations (and checkpoints) as often, relative to the run's length, as the preset's at its own."""
    return max(1, round(preset.eval_interval * iters / preset.iters))


# WSD's decay phase: the last fifth, after every method's last growth (RaPTr's full model from 0.75 of
# training, stacking's from 0.67), so that paths grow during the stable phase.
WSD_DECAY_SHARE = 0.2


def common_flags(preset: Preset, iters: int) -> List[str]:
    flags = [
        "--num-layers", preset.layers, "--hidden-size", preset.hidden, "--num-attention-heads", preset.heads,
        "--seq-length", preset.seq, "--micro-batch-size", preset.micro_batch,
        "--global-batch-size", preset.global_batch, "--train-iters", iters,
        "--lr", preset.lr, "--min-lr", preset.lr / 10, "--lr-decay-style", preset.lr_decay_style,
        "--lr-warmup-iters", max(1, iters // 10), "--weight-decay", 0.1, "--adam-beta2", preset.adam_beta2,
        "--hidden-dropout", 0, "--attention-dropout", 0,
        "--eval-interval", eval_interval(preset, iters), "--eval-iters", preset.eval_iters,
        "--log-interval", eval_interval(preset, iters),
    ]
    if preset.lr_decay_style == "WSD":
        flags += ["--lr-wsd-decay-style", "linear", "--lr-wsd-decay-iters", max(1, round(WSD_DECAY_SHARE * iters))]
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
        failed = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    if failed:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"run failed (exit status {failed}); the end of {log}:\n{tail}")


def hold_out(train: Path, fraction: float, data_dir: Path) -> Tuple[Path, Path]:
    """Training documents carved out (by a hash of their id, as fetch_corpus.py splits valid.jsonl) into
    a held-out validation set that no earlier choice, made on valid.jsonl, ever looked at; returns
    (train without them, them)."""
    kept, held = data_dir / "train_without_heldout.jsonl", data_dir / "heldout.jsonl"
    if not held.exists():
        lines = train.read_text().splitlines(keepends=True)
        out = [fetch_corpus.is_valid_document("heldout", json.loads(line)["id"], fraction) for line in lines]
        kept.write_text("".join(line for line, o in zip(lines, out) if not o))
        partial = held.with_suffix(".partial")  # heldout.jsonl, written last, marks a finished split
        partial.write_text("".join(line for line, o in zip(lines, out) if o))
        partial.replace(held)
    return kept, held


def prepare_data(preset: Preset, corpus_dir: Path, data_dir: Path, heldout_fraction: float = 0.0) -> Dict[str, str]:
    """Tokenizer and indexed datasets: the mixed train/valid sets, each source's valid documents and,
    with ``heldout_fraction``, a held-out set carved out of the training documents."""
    if not (corpus_dir / "corpus.json").exists():
        run_tool("fetch_corpus.py", "--output-dir", corpus_dir)
    inputs = {"train": corpus_dir / "train.jsonl", "valid": corpus_dir / "valid.jsonl"}
    if heldout_fraction:
        inputs["train"], inputs["heldout"] = hold_out(inputs["train"], heldout_fraction, data_dir)
    tokenizer = data_dir / f"spm{preset.vocab}"
    if not Path(f"{tokenizer}.model").exists():
        run_tool("train_tokenizer.py", "--input", inputs["train"], "--output-prefix", tokenizer,
                 "--vocab-size", preset.vocab)
    sources: Dict[str, List[str]] = {}
    with open(corpus_dir / "valid.jsonl") as f:
        for line in f:
            sources.setdefault(json.loads(line)["source"], []).append(line)
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
    lr: Optional[float] = None  # None: the preset's (and no LR in the name, as before --lrs)

    @property
    def name(self) -> str:
        lr = "" if self.lr is None else f"-lr{self.lr:g}"
        return f"{self.method}-{self.iters}it{lr}-s{self.seed}"


def train_and_evaluate(preset: Preset, data: Dict[str, str], run: Run, run_dir: Path, jobs: int,
                       source_eval: bool) -> dict:
    """One run (resumed if interrupted), then --skip-train evaluation of its final checkpoint."""
    result_file = run_dir / "result.json"
    if result_file.exists():
        result = json.loads(result_file.read_text())
        saved = result.get("settings", DEFAULT_SETTINGS)
        if saved != preset.settings():
            raise RuntimeError(f"{run_dir} holds a run with {saved}, not {preset.settings()}: give another --output-dir")
        if result["flags"] != list(run.flags):
            raise RuntimeError(f"{run_dir} holds a run with flags {result['flags']}, not {list(run.flags)}: "
                               "give the variant another name or another --output-dir")
        return result
    run_dir.mkdir(parents=True, exist_ok=True)
    if run.lr is not None:
        preset = dataclasses.replace(preset, lr=run.lr)
    if "--num-layers" in run.flags:  # a dense-L run: the evaluation, which leaves out run.flags, needs it too
        preset = dataclasses.replace(preset, layers=int(run.flags[run.flags.index("--num-layers") + 1]))
    common = common_flags(preset, run.iters) + data_flags(data) + [
        "--seed", str(run.seed), "--data-cache-path", str(run_dir.parent / "data_cache")]
    checkpoint = ["--save", str(run_dir / "ckpt"), "--load", str(run_dir / "ckpt")]
    launch(preset, common + list(run.flags) + checkpoint + [
        "--save-interval", str(eval_interval(preset, run.iters)),
        "--metrics-file", str(run_dir / "metrics.jsonl")], run_dir / "train.log", jobs)
    metrics = plot_metrics.read_metrics(run_dir / "metrics.jsonl")
    by_source = {}
    sources = [prefix for name, prefix in sorted(data.items()) if name.startswith("valid_")] if source_eval else []
    sources += [data["heldout"]] if "heldout" in data else []
    if sources:
        at = common.index("--valid-data-path")
        evaluation = common[:at] + ["--valid-data-path", data["valid"], *sources] + common[at + 2:] + checkpoint + [
            "--skip-train", "--multiple-validation-sets", "--metrics-file", str(run_dir / "eval.jsonl")]
        (run_dir / "eval.jsonl").unlink(missing_ok=True)
        launch(preset, evaluation, run_dir / "eval.log", jobs)
        by_source = {json.loads(line)["valid_set"]: json.loads(line)["val_loss"]
                     for line in (run_dir / "eval.jsonl").read_text().splitlines()}
    result = {
        "method": run.method, "seed": run.seed, "iterations": run.iters, "flags": list(run.flags),
        "model": preset.model(), "lr": preset.lr, "settings": preset.settings(),
        "final_val_loss": metrics["eval"][-1]["val_loss"],
        "total_flops": metrics["train"][-1]["cumulative_flops"],
        "wall_s": metrics["train"][-1]["elapsed_s"],
        "val_loss_by_source": by_source,
    }
    if "heldout" in data:
        result["heldout_val_loss"] = by_source[Path(data["heldout"]).name]
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


def sweep_losses(runs: List[dict], metric: str) -> Dict[int, Dict[str, Dict[float, float]]]:
    """budget -> method -> LR -> the mean of ``metric`` over the runs' seeds."""
    losses: Dict[Tuple[int, str, float], List[float]] = {}
    for run in runs:
        losses.setdefault((run["budget"], run["method"], run["lr"]), []).append(run[metric])
    table: Dict[int, Dict[str, Dict[float, float]]] = {}
    for (budget, method, lr), values in sorted(losses.items()):
        table.setdefault(budget, {}).setdefault(method, {})[lr] = statistics.mean(values)
    return table


def choose_lrs(sweep: Dict[int, Dict[str, Dict[float, float]]]) -> Dict[int, Dict[str, float]]:
    """Each method's LR of lowest mean loss, per budget."""
    return {budget: {method: min(by_lr, key=by_lr.get) for method, by_lr in methods.items()}
            for budget, methods in sweep.items()}


def is_dense(method: str) -> bool:
    return method in ("baseline", "baseline-equal-flops") or method.startswith("dense-")


FLOPS_SLACK = 1.02  # a sampled path's FLOPs differ a little from its expectation


def best_dense(groups: Dict[str, Tuple[float, float]], flops: float) -> Optional[str]:
    """Of the dense methods in ``groups`` (method -> (FLOPs, loss)) that spend at most ``flops``, the one
    of lowest loss: the best dense model for this compute (None: none is that cheap)."""
    cheap = [m for m, (f, _) in groups.items() if is_dense(m) and f <= flops * FLOPS_SLACK]
    return min(cheap, key=lambda m: groups[m][1], default=None)


def frontier(losses: Dict[float, float], target: float) -> Optional[float]:
    """The smallest FLOPs fraction whose loss (``losses``: fraction -> loss) reaches ``target``."""
    return min((f for f, loss in losses.items() if loss <= target), default=None)


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


def finished_runs(runs_dir: Path, preset: Preset, methods: Sequence[str], roles: Dict[int, str]) -> List[dict]:
    """The runs of these methods and seeds (seed -> its role) that have finished under the preset's settings,
    with their validation loss along training (``evals``: [iteration, loss] pairs): a study spanning
    sessions, reported so far."""
    finished = []
    for result_file in sorted(runs_dir.glob("*/result.json")):
        result = json.loads(result_file.read_text())
        if (result["method"] in methods and result["seed"] in roles
                and result.get("settings", DEFAULT_SETTINGS) == preset.settings()):
            evals = plot_metrics.read_metrics(result_file.parent / "metrics.jsonl")["eval"]
            finished.append(dict(result, name=result_file.parent.name, role=roles[result["seed"]],
                                 evals=[[r["iteration"], r["val_loss"]] for r in evals]))
    return finished


def progress_markdown(runs: List[dict], preset_name: str, plan: str) -> str:
    lines = [f"Preset `{preset_name}`: {len(runs)} runs finished; the plan: {plan}. Mean ± standard deviation over "
             "the seeds finished; the held-out loss is evaluated for report runs alone.", "",
             "| role | method | iterations | lr | seeds | final val loss | held-out loss |", "|---" * 7 + "|"]
    groups: Dict[tuple, List[dict]] = {}
    for run in runs:
        groups.setdefault((run["role"], run["method"], run["iterations"], run["lr"]), []).append(run)
    for (role, method, iters, lr), group in sorted(groups.items()):
        heldout = [r["heldout_val_loss"] for r in group if "heldout_val_loss" in r]
        lines.append(f"| {role} | {method} | {iters} | {lr:g} | {' '.join(str(r['seed']) for r in group)} | "
                     f"{mean_spread([r['final_val_loss'] for r in group])} | {mean_spread(heldout)} |")
    return "\n".join(lines) + "\n"


def parse_variant(text: str) -> Tuple[str, Tuple[str, ...]]:
    name, equals, flags = text.partition("=")
    if not equals or not name or name in METHODS or "/" in name:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME=FLAGS with a NAME that is not one of "
                                         f"{METHODS}")
    return name, tuple(shlex.split(flags))


def dense_choices(runs: List[dict], metric: str) -> Dict[int, Dict[str, Optional[str]]]:
    """budget -> each other method -> the best dense model for its compute, by the runs' means."""
    choices = {}
    for budget in sorted({r["budget"] for r in runs}):
        groups = {}
        for method in dict.fromkeys(r["method"] for r in runs if r["budget"] == budget):
            group = [r for r in runs if r["method"] == method and r["budget"] == budget]
            groups[method] = (statistics.mean(r["total_flops"] for r in group), statistics.mean(r[metric] for r in group))
        choices[budget] = {m: best_dense(groups, flops) for m, (flops, _) in groups.items() if not is_dense(m)}
    return choices


def compare_with_dense(runs: List[dict], choices: Dict[int, Dict[str, Optional[str]]], metric: str) -> None:
    """Adds delta_vs_best_dense: ``metric`` minus the same seed's best dense model for the run's compute."""
    by_key = {(r["method"], r["seed"], r["budget"]): r for r in runs}
    for run in runs:
        dense = choices.get(run["budget"], {}).get(run["method"])
        reference = by_key.get((dense, run["seed"], run["budget"]))
        run["delta_vs_best_dense"] = None if reference is None else run[metric] - reference[metric]


def frontier_table(runs: List[dict], metric: str, fractions: Sequence[float]) -> Dict[int, dict]:
    """budget -> the full model's mean loss, auto:F's and stacking at F's mean loss per F, and the smallest F
    at which each reaches the full model's loss."""
    table = {}
    for budget in sorted({r["budget"] for r in runs}):
        def mean(method: str) -> float:
            return statistics.mean(r[metric] for r in runs if r["method"] == method and r["budget"] == budget)
        entry = {"target": mean("baseline")}
        for family in ("auto", "stacking"):
            entry[family] = {f: mean(f"{family}-{f:g}") for f in fractions}
            entry[f"{family}_reaches_at"] = frontier(entry[family], entry["target"])
        table[budget] = entry
    return table


def plot_frontier(runs: List[dict], metric: str, fractions: Sequence[float], budget: int, output: Path) -> None:
    """Loss against FLOPs (relative to the full model's) of auto:F, stacking at F and the dense models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def point(method: str) -> Tuple[float, float]:
        group = [r for r in runs if r["method"] == method and r["budget"] == budget]
        return statistics.mean(r["total_flops"] for r in group), statistics.mean(r[metric] for r in group)

    full_flops, target = point("baseline")
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for family in ("auto", "stacking"):
        xs, ys = zip(*(point(f"{family}-{f:g}") for f in fractions))
        ax.plot([x / full_flops for x in xs], ys, marker="o", label=f"{family} at F")
    for method in sorted({r["method"] for r in runs if is_dense(r["method"]) and r["budget"] == budget}):
        flops, loss = point(method)
        ax.scatter([flops / full_flops], [loss], marker="s", color="black")
        ax.annotate(method, (flops / full_flops, loss), fontsize=7)
    ax.axhline(target, color="grey", linestyle="--", label="full model's final loss")
    ax.set_xlabel("model FLOPs relative to the full model")
    ax.set_ylabel(metric)
    ax.set_title(f"FLOPs frontier, {budget} iterations (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output)
    plt.close(fig)


def protocol_markdown(protocol: dict, choices: Dict[int, Dict[str, Optional[str]]], runs: List[dict], metric: str,
                      frontiers: Dict[int, dict]) -> str:
    """The LR sweep, the best dense model for each method's compute and the FLOPs frontier."""
    lines = []
    if protocol:
        lines += [f"Held-out protocol: every method (a FLOPs-frontier point: its family, raptr or stacking) swept "
                  f"over LRs {protocol['lrs']} on selection seeds "
                  f"{protocol['selection_seeds']}; its LR and the best dense models chosen by the mean final loss "
                  "on the mixed validation set (valid.jsonl); the rows above are report seeds "
                  f"{protocol['report_seeds']} at the chosen LRs, judged on `{metric}`: {protocol['heldout']}.", ""]
        for budget, methods in protocol["lr_sweep"].items():
            lines += [f"**LR sweep, {budget} iterations** (mean final validation loss, selection seeds)", "",
                      "| method | " + " | ".join(f"lr {lr:g}" for lr in protocol["lrs"]) + " | chosen |",
                      "|---" * (len(protocol["lrs"]) + 2) + "|"]
            lines += [f"| {method} | " + " | ".join(f"{by_lr[lr]:.4f}" for lr in protocol["lrs"])
                      + f" | {protocol['chosen_lr'][budget][method]:g} |" for method, by_lr in methods.items()]
            lines.append("")
    for budget, methods in choices.items():
        if not methods:
            continue
        lines += [f"**The best dense model for each method's compute, {budget} iterations** (the dense model of "
                  f"lowest loss among those spending at most its FLOPs; `{metric}` minus that model's, same seed)", "",
                  "| method | best dense model for this compute | minus its loss (below / runs) |", "|---|---|---|"]
        for method, dense in methods.items():
            deltas = [r["delta_vs_best_dense"] for r in runs if r["method"] == method and r["budget"] == budget
                      and r["delta_vs_best_dense"] is not None]
            lines.append(f"| {method} | {dense or 'none'} | "
                         f"{mean_spread(deltas)} ({sum(d < 0 for d in deltas)}/{len(deltas)}) |")
        lines.append("")
    for budget, entry in frontiers.items():
        lines += [f"**FLOPs frontier, {budget} iterations** (mean `{metric}`; the full model's: "
                  f"{entry['target']:.4f})", "", "| F | auto:F | stacking at F |", "|---|---|---|"]
        lines += [f"| {f:g} | {entry['auto'][f]:.4f} | {entry['stacking'][f]:.4f} |" for f in entry["auto"]]
        reach = {family: "never" if entry[f"{family}_reaches_at"] is None else f"F = {entry[f'{family}_reaches_at']:g}"
                 for family in ("auto", "stacking")}
        lines += ["", f"Smallest F reaching the full model's loss: auto {reach['auto']}, stacking {reach['stacking']}.",
                  ""]
    return "\n".join(lines)


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
    parser.add_argument("--lr-decay-style", choices=("cosine", "WSD"), default="cosine",
                        help=f"for every run; WSD decays linearly over the last {WSD_DECAY_SHARE:g} of training")
    parser.add_argument("--source-eval", action=argparse.BooleanOptionalAction, default=True,
                        help="evaluate every final checkpoint on each corpus source too")
    parser.add_argument("--dense-depths", nargs="+", type=int, default=[], metavar="L",
                        help="dense-L methods: the dense model of L layers for the full number of steps")
    parser.add_argument("--frontier", nargs="+", type=float, default=[], metavar="F",
                        help="auto-F (--raptr-schedule auto:F) and stacking-F (stacking_stages) methods, and the "
                             "smallest F at which each reaches the full model's loss")
    parser.add_argument("--lrs", nargs="+", type=float, default=None,
                        help="the held-out protocol: every method at each of these LRs (at least 3, spaced 2x) on "
                             "--selection-seeds, then at its best on --report-seeds, reported on held-out text")
    parser.add_argument("--selection-seeds", nargs="+", type=int, default=None)
    parser.add_argument("--report-seeds", nargs="+", type=int, default=None)
    parser.add_argument("--heldout-fraction", type=float, default=0.03,
                        help="with --lrs: share of training documents carved out as the held-out set")
    parser.add_argument("--progress", action="store_true",
                        help="train nothing: write DIR/progress.{json,md}, the runs of this study finished so far "
                             "(a study spanning sessions)")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    budgets = args.iters or [preset.iters]
    protocol = args.lrs is not None
    lrs = sorted(args.lrs or [])
    if protocol:
        if not args.selection_seeds or not args.report_seeds or args.seeds:
            parser.error("--lrs needs --selection-seeds and --report-seeds (and no --seeds)")
        if set(args.selection_seeds) & set(args.report_seeds):
            parser.error("--selection-seeds and --report-seeds must not share a seed")
        if len(lrs) < 3 or any(not math.isclose(high, 2 * low) for low, high in zip(lrs, lrs[1:])):
            parser.error("--lrs: at least 3 LRs, each twice the one before (e.g. 1e-3 2e-3 4e-3)")
        if not 0 < args.heldout_fraction < 1:
            parser.error("--heldout-fraction must lie in (0, 1)")
    elif args.selection_seeds or args.report_seeds:
        parser.error("--selection-seeds and --report-seeds belong to the held-out protocol: give --lrs")
    preset = dataclasses.replace(preset, seeds=tuple(args.report_seeds or args.seeds or preset.seeds),
                                 adam_beta2=args.adam_beta2 or preset.adam_beta2, lr_decay_style=args.lr_decay_style)
    if "baseline-equal-flops" in args.methods and not {"baseline", "raptr"} <= set(args.methods):
        parser.error("--methods: baseline-equal-flops needs baseline and raptr (it spends RaPTr's FLOPs)")
    if args.variant and "raptr" not in args.methods:
        parser.error("--variant: variants change the raptr method's flags; --methods needs raptr")
    if len({name for name, _ in args.variant}) != len(args.variant):
        parser.error("--variant: two variants share a name")
    if min(budgets) < 1 or args.jobs < 1:
        parser.error("--iters and --jobs need positive numbers")
    if any(not 1 <= depth < preset.layers for depth in args.dense_depths):
        parser.error(f"--dense-depths: depths below the preset's {preset.layers} layers")
    if args.frontier and "baseline" not in args.methods:
        parser.error("--frontier needs the baseline method (whose loss it is the frontier of)")
    if args.frontier and protocol and not {"raptr", "stacking"} <= set(args.methods):
        parser.error("--frontier with --lrs needs the raptr and stacking methods (whose chosen LRs it runs at)")
    for fraction in args.frontier:
        try:  # refused now rather than when the run starts
            auto_stages(f"auto:{fraction:g}", preset.layers, 2)
            stacking_stages(preset.layers, fraction)
        except ValueError as error:
            parser.error(f"--frontier {fraction:g}: {error}")
    out = Path(args.output_dir).resolve()

    def flags(method: str, iters: int) -> Tuple[str, ...]:
        return tuple(method_flags(method, dataclasses.replace(preset, iters=iters)))

    specs: Dict[str, Callable[[int], Tuple[str, ...]]] = {
        m: functools.partial(flags, m) for m in METHODS if m in args.methods and m != "baseline-equal-flops"}
    specs.update({f"dense-{d}": lambda iters, d=d: ("--num-layers", str(d)) for d in args.dense_depths})
    family = {**{f"auto-{f:g}": "raptr" for f in args.frontier}, **{f"stacking-{f:g}": "stacking" for f in args.frontier}}
    specs.update({f"auto-{f:g}": lambda iters, f=f: ("--raptr-schedule", f"auto:{f:g}") for f in args.frontier})
    specs.update({f"stacking-{f:g}": lambda iters, f=f: ("--stacking-schedule", stacking_stages(preset.layers, f))
                  for f in args.frontier})
    specs.update({name: lambda iters, extra=extra: flags("raptr", iters) + extra for name, extra in args.variant})
    runs_dir = out / "runs"
    names = [m for m in METHODS if m in args.methods] + [m for m in specs if m not in METHODS]
    if args.progress:
        per_seed = len(budgets) * (len(specs) + ("baseline-equal-flops" in args.methods))
        # Under the protocol the selection runs (every method but the frontier's, at each LR) come first and
        # choose the report runs' LRs.
        plan = (f"{len(args.selection_seeds) * (per_seed - len(budgets) * len(family)) * len(lrs)} selection runs, "
                f"then {len(preset.seeds) * per_seed} report runs" if protocol else f"{len(preset.seeds) * per_seed} runs")
        roles = {**{s: "selection" for s in args.selection_seeds or []}, **{s: "report" for s in preset.seeds}}
        runs = finished_runs(runs_dir, preset, names, roles)
        out.mkdir(parents=True, exist_ok=True)
        (out / "progress.json").write_text(json.dumps({"preset": args.preset, "settings": preset.settings(),
                                                        "plan": plan, "runs": runs}, indent=1))
        (out / "progress.md").write_text(progress_markdown(runs, args.preset, plan))
        print((out / "progress.md").read_text())
        return
    # Its own data with a held-out set: a tokenizer or training set built without one saw the held-out text.
    data_dir = out / (f"data-heldout{args.heldout_fraction:g}" if protocol else "data")
    data_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(preset, Path(args.corpus_dir).resolve(), data_dir, args.heldout_fraction if protocol else 0)

    def execute(run: Run, data: Dict[str, str]) -> dict:
        sys.stdout.write(f"study: {run.method}, seed {run.seed}, {run.iters} iterations, lr {run.lr or preset.lr:g}\n")
        sys.stdout.flush()
        result = train_and_evaluate(preset, data, run, runs_dir / run.name, args.jobs, args.source_eval)
        return dict(result, name=run.name, budget=run.budget)

    def study(pool: concurrent.futures.Executor, seeds: Sequence[int],
              lrs_of: Callable[[str, int], Sequence[Optional[float]]], data: Dict[str, str]) -> List[dict]:
        """Every method on every seed and budget at each of its lrs_of(method, budget), then the equal-FLOPs
        baseline: as many full-model steps as RaPTr's FLOPs buy."""
        planned = [Run(name, seed, iters, spec(iters), iters, lr) for iters in budgets for seed in seeds
                   for name, spec in specs.items() for lr in lrs_of(name, iters)]
        runs = list(pool.map(functools.partial(execute, data=data), planned))
        if "baseline-equal-flops" in args.methods:
            # A run's FLOPs do not depend on its LR (paths are drawn from the seed and the iteration).
            done = {(r["method"], r["seed"], r["budget"]): r for r in runs}
            equal = []
            for iters in budgets:
                for seed in seeds:
                    per_step = done["baseline", seed, iters]["total_flops"] / iters
                    steps = max(1, int(done["raptr", seed, iters]["total_flops"] / per_step))
                    equal += [Run("baseline-equal-flops", seed, steps, (), iters, lr)
                              for lr in lrs_of("baseline-equal-flops", iters)]
            runs += list(pool.map(functools.partial(execute, data=data), equal))
        return runs

    order = lambda r: (r["budget"], r["seed"], names.index(r["method"]), r.get("lr") or 0.0)  # noqa: E731
    record: dict = {"preset": args.preset, "settings": preset.settings()}
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        if protocol:
            # The selection runs never see the held-out set: no choice can look at it.
            selection = study(pool, args.selection_seeds, lambda method, budget: [] if method in family else lrs,
                              {k: v for k, v in data.items() if k != "heldout"})
            sweep = sweep_losses(selection, "final_val_loss")
            chosen = choose_lrs(sweep)
            for by_method in chosen.values():
                by_method.update({point: by_method[family[point]] for point in family})
            runs = study(pool, args.report_seeds, lambda method, budget: [chosen[budget][method]], data)
            # The best dense model for each compute is a choice too: made on the selection runs at their LRs.
            # The frontier's report runs add their FLOPs alone (a choice reads only dense models' losses).
            choices = dense_choices([r for r in selection if r["lr"] == chosen[r["budget"]][r["method"]]]
                                    + [r for r in runs if r["method"] in family], "final_val_loss")
            record["protocol"] = {
                "lrs": lrs, "selection_seeds": args.selection_seeds, "report_seeds": args.report_seeds,
                "heldout_fraction": args.heldout_fraction,
                "heldout": f"{args.heldout_fraction:g} of the training documents, by a hash of their id, held "
                           "out of training and of every choice (heldout_val_loss)",
                "lr_sweep": sweep, "chosen_lr": chosen}
            record["selection_runs"] = sorted(selection, key=order)
        else:
            runs = study(pool, preset.seeds, lambda method, budget: [None], data)
    metric = "heldout_val_loss" if protocol else "final_val_loss"
    if not protocol:
        choices = dense_choices(runs, metric)

    runs.sort(key=order)
    runs = summarize(runs, runs_dir)
    if args.dense_depths:
        compare_with_dense(runs, choices, metric)
        record["best_dense"] = choices
    frontiers = frontier_table(runs, metric, args.frontier) if args.frontier else {}
    if frontiers:
        record["frontier"] = frontiers
    record["runs"] = runs
    (out / "results.json").write_text(json.dumps(record, indent=1))
    extra = protocol_markdown(record.get("protocol", {}), choices if args.dense_depths else {}, runs, metric,
                              frontiers)
    (out / "results.md").write_text(markdown(runs, args.preset, names) + ("\n" + extra if extra else ""))
    seed, budget = preset.seeds[0], max(budgets)
    first = {r["method"]: plot_metrics.read_metrics(runs_dir / r["name"] / "metrics.jsonl")
             for r in runs if r["seed"] == seed and r["budget"] == budget}
    title = f"{args.preset}: seed {seed}, {budget} iterations"
    plot_metrics.plot(first, out / "loss_vs_flops.png", "flops", title, train_loss=False)
    plot_metrics.plot(first, out / "loss_vs_time.png", "time", title, train_loss=False)
    plot_metrics.plot({m: first[m] for m in ("baseline", "raptr", "stacking") if m in first},
                      out / "stage_boundaries.png", "iterations", "training loss around stage boundaries")
    if frontiers:
        plot_frontier(runs, metric, args.frontier, budget, out / "frontier.png")
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
