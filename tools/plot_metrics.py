"""Plot runs' --metrics-file records: validation loss (lines with dots) and training loss (faint)
against cumulative FLOPs, training time or iterations, with stage boundaries marked.

    python tools/plot_metrics.py runs/raptr/metrics.jsonl runs/baseline/metrics.jsonl \
        --output loss.png --x flops [--labels raptr baseline] [--title ...]

Labels default to each file's directory name. Needs matplotlib (pip install matplotlib).
"""

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

AXES = {"flops": ("cumulative_flops", "model FLOPs (active layers)"),
        "time": ("elapsed_s", "training time (s)"),
        "iterations": ("iteration", "iteration")}


def read_metrics(path: str) -> Dict[str, List[dict]]:
    """Train and eval records of a metrics file (a resumed run's repeated records: the last wins)."""
    train, evals = {}, {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{number}: not a JSON line") from None
            if "lm_loss" in record:
                train[record["iteration"]] = record
            elif "val_loss" in record and "valid_set" not in record:
                evals[record["iteration"]] = record
    if not train:
        raise ValueError(f"{path}: no train records (is it a --metrics-file?)")
    return {"train": [train[i] for i in sorted(train)], "eval": [evals[i] for i in sorted(evals)]}


def eval_points(metrics: Dict[str, List[dict]], x: str) -> List[tuple]:
    """(x, val_loss) per evaluation; x read off the train record of the same iteration."""
    by_iteration = {r["iteration"]: r for r in metrics["train"]}
    return [(by_iteration[e["iteration"]][AXES[x][0]], e["val_loss"])
            for e in metrics["eval"] if e["iteration"] in by_iteration]


def stage_boundaries(metrics: Dict[str, List[dict]], x: str) -> List[float]:
    train = metrics["train"]
    return [cur[AXES[x][0]] for prev, cur in zip(train, train[1:]) if cur["stage"] != prev["stage"]]


def plot(runs: Dict[str, Dict[str, List[dict]]], output: str, x: str = "flops", title: Optional[str] = None,
         train_loss: bool = True) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label = AXES[x]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for index, (name, metrics) in enumerate(runs.items()):
        color = f"C{index % 10}"
        if train_loss:
            ax.plot([r[key] for r in metrics["train"]], [r["lm_loss"] for r in metrics["train"]],
                    color=color, alpha=0.25, linewidth=0.8)
        points = eval_points(metrics, x)
        if points:
            ax.plot(*zip(*points), color=color, marker="o", markersize=3, label=f"{name} (validation)")
        for boundary in stage_boundaries(metrics, x):
            ax.axvline(boundary, color=color, linestyle=":", linewidth=0.8)
    ax.set_xlabel(label)
    ax.set_ylabel("loss (faint: training; dotted: stage boundaries)" if train_loss
                  else "validation loss (dotted: stage boundaries)")
    ax.set_title(title or f"loss vs {label}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", nargs="+", help="--metrics-file JSON-lines files")
    parser.add_argument("--output", required=True, help="PNG file to write")
    parser.add_argument("--x", choices=sorted(AXES), default="flops")
    parser.add_argument("--labels", nargs="+", default=None, help="one per file (default: directory names)")
    parser.add_argument("--title", default=None)
    parser.add_argument("--no-train-loss", action="store_true", help="validation loss only")
    args = parser.parse_args(argv)
    labels = args.labels or [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in args.metrics]
    if len(labels) != len(args.metrics):
        parser.error(f"--labels: {len(labels)} labels for {len(args.metrics)} files")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        parser.error("needs matplotlib: pip install matplotlib")
    try:
        runs = {label: read_metrics(path) for label, path in zip(labels, args.metrics)}
    except (OSError, ValueError) as error:
        parser.error(str(error))
    plot(runs, args.output, args.x, args.title, train_loss=not args.no_train_loss)
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
