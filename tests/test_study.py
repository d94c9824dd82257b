"""tools/study.py end to end on a tiny corpus, tools/plot_metrics.py, --skip-train and
--multiple-validation-sets (which the study uses)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.documents import stdlib_documents

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["baseline", "raptr", "baseline-equal-flops", "stacking", "pld"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The smoke preset, shortened, on a corpus in fetch_corpus.py's format with two sources."""
    root = tmp_path_factory.mktemp("study")
    corpus = root / "corpus"
    corpus.mkdir()
    documents = stdlib_documents()
    records = [{"id": str(i), "source": "odd" if i % 2 else "even", "title": str(i), "text": text}
               for i, text in enumerate(documents)]
    (corpus / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records if int(r["id"]) % 7))
    (corpus / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records if not int(r["id"]) % 7))
    (corpus / "corpus.json").write_text("{}")
    out = root / "out"
    result = subprocess.run([sys.executable, "tools/study.py", "--preset", "smoke", "--iters", "12",
                             "--output-dir", str(out), "--corpus-dir", str(corpus), "--methods", *METHODS],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


def test_study_writes_results_tables_and_plots(study):
    out, _ = study
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["method"] for r in runs] == METHODS
    for run in runs:
        assert set(run) >= {"method", "seed", "final_val_loss", "total_flops", "wall_s", "flops_to_baseline_loss",
                            "time_to_baseline_loss", "flags", "model", "val_loss_by_source"}
        assert set(run["val_loss_by_source"]) == {"valid_text_document", "valid_even_text_document",
                                                  "valid_odd_text_document"}
    baseline, raptr, equal, stacking, pld = runs
    assert baseline["flops_to_baseline_loss"] == baseline["total_flops"]  # reached at its own end
    # The equal-FLOPs baseline trains the full model for the steps RaPTr's FLOPs buy.
    assert raptr["total_flops"] < baseline["total_flops"]
    assert equal["iterations"] == int(raptr["total_flops"] / (baseline["total_flops"] / 12)) < 12
    assert raptr["delta_vs_equal_flops"] == pytest.approx(raptr["final_val_loss"] - equal["final_val_loss"])
    assert equal["total_flops"] <= raptr["total_flops"]
    assert stacking["total_flops"] < baseline["total_flops"] and pld["total_flops"] < baseline["total_flops"]
    assert stacking["flags"][0] == "--stacking-schedule" and pld["flags"][0] == "--pld-theta"
    table = (out / "results.md").read_text()
    assert all(f"| {method} | 1 |" in table for method in METHODS)
    for name in ("loss_vs_flops.png", "loss_vs_time.png", "stage_boundaries.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_skip_train_evaluates_the_checkpoint_as_training_did(study):
    """--skip-train on the mixed set repeats the final in-training validation loss."""
    out, _ = study
    run = out / "runs" / "raptr-12it-s1"
    final_eval = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                  if "val_loss" in json.loads(line)][-1]
    evals = {json.loads(line)["valid_set"]: json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()}
    assert evals["valid_text_document"]["iteration"] == final_eval["iteration"] == 12
    assert evals["valid_text_document"]["val_loss"] == pytest.approx(final_eval["val_loss"], rel=1e-6)
    assert evals["valid_even_text_document"]["val_loss"] != evals["valid_odd_text_document"]["val_loss"]


def test_rerun_skips_finished_runs(study):
    out, _ = study
    logs = {log: log.stat().st_size for log in out.glob("runs/*/*.log")}
    results = (out / "results.json").read_text()
    result = subprocess.run([sys.executable, "tools/study.py", "--preset", "smoke", "--iters", "12", "--output-dir",
                             str(out), "--corpus-dir", str(out.parent / "corpus"), "--methods", *METHODS],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {log: log.stat().st_size for log in out.glob("runs/*/*.log")} == logs  # nothing launched
    assert (out / "results.json").read_text() == results


def test_plot_metrics_cli(study, tmp_path):
    out, _ = study
    png = tmp_path / "plot.png"
    result = subprocess.run([sys.executable, "tools/plot_metrics.py", str(out / "runs/raptr-12it-s1/metrics.jsonl"),
                             str(out / "runs/baseline-12it-s1/metrics.jsonl"), "--x", "iterations", "--output", str(png)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert png.read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run([sys.executable, "tools/plot_metrics.py", str(out / "results.json"), "--output", str(png)],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "not a JSON line" in bad.stderr


def test_budgets_and_variants(study):
    """Two budgets, a variant beside raptr, side by side (--jobs 2): every budget has its own
    equal-FLOPs baseline, and a variant's flags follow raptr's so they override them."""
    out = study[0].parent / "variants"
    argv = [sys.executable, "tools/study.py", "--preset", "smoke", "--iters", "6", "12", "--output-dir", str(out),
            "--corpus-dir", str(study[0].parent / "corpus"), "--methods", "baseline", "raptr", "baseline-equal-flops",
            "--variant", "two-stage=--raptr-schedule 3@0,6@0.5 --raptr-scaling none", "--jobs", "2",
            "--no-source-eval"]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = {(r["method"], r["budget"]): r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert sorted(runs) == sorted((m, b) for m in ("baseline", "raptr", "baseline-equal-flops", "two-stage")
                                  for b in (6, 12))
    for budget in (6, 12):
        assert runs["baseline-equal-flops", budget]["iterations"] < budget
        variant = runs["two-stage", budget]
        assert variant["flags"] == runs["raptr", budget]["flags"] + ["--raptr-schedule", "3@0,6@0.5",
                                                                      "--raptr-scaling", "none"]
        log = (out / "runs" / f"two-stage-{budget}it-s1" / "train.log").read_text()
        assert "scaling none" in log and "stage 1: iterations" in log and "stage 2:" not in log  # not raptr's
        assert variant["delta_vs_equal_flops"] == pytest.approx(
            variant["final_val_loss"] - runs["baseline-equal-flops", budget]["final_val_loss"])
    table = (out / "results.md").read_text()
    assert "**6 iterations**" in table and "**12 iterations**" in table and "| two-stage | 1 |" in table
    # A rerun with other flags under a finished variant's name is refused rather than mixed up.
    argv[argv.index("two-stage=--raptr-schedule 3@0,6@0.5 --raptr-scaling none")] = "two-stage=--raptr-scaling none"
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "give the variant another name" in result.stderr
