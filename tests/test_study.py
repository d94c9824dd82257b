"""tools/study.py end to end on a tiny corpus, tools/plot_metrics.py, --skip-train and
--multiple-validation-sets (which the study uses)."""

import dataclasses
import json
import math
import re
import shlex
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


# The held-out protocol, the best dense model and the FLOPs frontier, with training replaced by losses
# made up per (method, LR, seed): their choices are then known in advance.

sys.path.insert(0, str(ROOT / "tools"))
import study as study_tool  # noqa: E402

SELECTION, REPORT, LRS = [1, 2], [11, 12], [1e-3, 2e-3, 4e-3]
FRONTIER = ("auto-0.6", "auto-0.9", "stacking-0.6", "stacking-0.9")
FLOPS = {"baseline": 6, "raptr": 4.5, "stacking": 4.5, "dense-3": 3, "dense-4": 4, "auto-0.6": 3.6, "auto-0.9": 5.4,
         "stacking-0.6": 3.6, "stacking-0.9": 5.4}  # per step
LOSS = {"baseline": 3.0, "raptr": 3.2, "stacking": 3.15, "baseline-equal-flops": 3.3, "dense-3": 3.4, "dense-4": 3.25,
        "auto-0.6": 3.1, "auto-0.9": 2.99, "stacking-0.6": 3.5, "stacking-0.9": 3.05}


def made_up_loss(method, lr, seed):
    """Lowest at 2e-3 on the selection seeds, at 4e-3 on the report seeds: only a choice made on the
    selection seeds picks 2e-3. (A frontier point's own lowest is at 1e-3: it is never swept, but runs
    at its family's LR.)"""
    best = 1e-3 if method in FRONTIER else 2e-3 if seed in SELECTION else 4e-3
    return LOSS[method] + abs(math.log2(lr / best)) * 0.1 + seed * 1e-4


def fake_train_and_evaluate(preset, data, run, run_dir, jobs, source_eval):
    run_dir.mkdir(parents=True, exist_ok=True)
    lr = run.lr or preset.lr
    loss = made_up_loss(run.method, lr, run.seed)
    flops = run.iters * FLOPS.get(run.method, 6)
    records = [{"iteration": i, "lm_loss": loss + 1 / i, "cumulative_flops": flops * i / run.iters,
                "elapsed_s": i, "stage": 0} for i in range(1, run.iters + 1)]
    records += [{"iteration": run.iters, "val_loss": loss}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = {"method": run.method, "seed": run.seed, "iterations": run.iters, "flags": list(run.flags),
              "model": preset.model(), "lr": lr, "final_val_loss": loss, "total_flops": flops, "wall_s": 1.0,
              "val_loss_by_source": {}}
    if "heldout" in data:
        result["heldout_val_loss"] = loss + 0.5
    return result


@pytest.fixture(scope="module")
def protocol(tmp_path_factory):
    out = tmp_path_factory.mktemp("protocol")
    patch = pytest.MonkeyPatch()
    patch.setattr(study_tool, "train_and_evaluate", fake_train_and_evaluate)
    patch.setattr(study_tool, "prepare_data", lambda preset, corpus, data_dir, heldout: dict(
        {"train": "train", "valid": "valid"}, **({"heldout": "heldout"} if heldout else {})))
    try:
        study_tool.main(["--preset", "smoke", "--iters", "10", "--output-dir", str(out), "--methods", "baseline",
                         "raptr", "stacking", "baseline-equal-flops", "--dense-depths", "3", "4", "--frontier", "0.6", "0.9",
                         "--lrs", *map(str, LRS), "--selection-seeds", *map(str, SELECTION),
                         "--report-seeds", *map(str, REPORT)])
    finally:
        patch.undo()
    return out, json.loads((out / "results.json").read_text())


def test_protocol_chooses_lrs_on_selection_seeds_and_reports_on_others(protocol):
    out, results = protocol
    methods = set(LOSS)
    assert results["protocol"]["selection_seeds"] == SELECTION and results["protocol"]["report_seeds"] == REPORT
    assert results["protocol"]["chosen_lr"] == {"10": {m: 2e-3 for m in methods}}
    selection, report = results["selection_runs"], results["runs"]
    assert {(r["method"], r["seed"], r["lr"]) for r in selection} == {
        (m, s, lr) for m in methods - set(FRONTIER) for s in SELECTION for lr in LRS}
    assert {(r["method"], r["seed"], r["lr"]) for r in report} == {(m, s, 2e-3) for m in methods for s in REPORT}
    # The held-out set is evaluated for the report runs alone: no choice can have looked at it.
    assert all("heldout_val_loss" not in r for r in selection)
    assert all(r["heldout_val_loss"] == pytest.approx(made_up_loss(r["method"], 2e-3, r["seed"]) + 0.5)
               for r in report)
    table = (out / "results.md").read_text()
    assert "**LR sweep, 10 iterations**" in table and "| baseline | 3.1" in table
    for name in ("loss_vs_flops.png", "frontier.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_best_dense_model_for_the_compute(protocol):
    """RaPTr's compute (0.75 of the full model's) buys the full model on equal FLOPs, dense-3 and dense-4,
    not the full model: dense-4 has the lowest loss of those."""
    _, results = protocol
    assert results["best_dense"]["10"]["raptr"] == "dense-4"
    assert results["best_dense"]["10"]["auto-0.9"] == "dense-4"  # 0.9 buys no more: the full model spends 1
    assert results["best_dense"]["10"]["auto-0.6"] == "dense-3"  # the only one as cheap
    for run in (r for r in results["runs"] if r["method"] == "raptr"):
        dense = next(r for r in results["runs"] if r["method"] == "dense-4" and r["seed"] == run["seed"])
        assert run["delta_vs_best_dense"] == pytest.approx(run["heldout_val_loss"] - dense["heldout_val_loss"])
    groups = {"baseline": (1.0, 3.0), "dense-3": (0.5, 3.4), "dense-4": (0.67, 3.25), "raptr": (0.75, 3.2)}
    assert study_tool.best_dense(groups, 0.75) == "dense-4"
    assert study_tool.best_dense(groups, 0.4) is None


def test_frontier_is_the_smallest_fraction_reaching_the_full_model(protocol):
    assert study_tool.frontier({0.4: 3.1, 0.5: 2.95, 0.6: 3.0, 0.75: 2.9}, 2.96) == 0.5
    assert study_tool.frontier({0.5: 3.1, 0.75: 3.0}, 2.96) is None
    frontier = protocol[1]["frontier"]["10"]
    assert frontier["target"] == pytest.approx(3.6 + 0.00115)  # the baseline's held-out loss, report seeds
    assert frontier["auto_reaches_at"] == 0.9 and frontier["stacking_reaches_at"] is None


def test_stacking_at_a_fraction_spends_it():
    from megatron_raptr.stacking import StackingSchedule

    assert study_tool.stacking_stages(12, 0.75) == "3@0,6@0.2000,12@0.4000"
    for fraction in (0.4, 0.5, 0.6, 0.75):
        schedule = StackingSchedule.parse(study_tool.stacking_stages(12, fraction), 12, 3000)  # doubles at most
        assert schedule.expected_layer_fraction(3000) == pytest.approx(fraction, abs=1e-3)
    with pytest.raises(ValueError, match="--stacking-schedule: stacking 2 -> 3 -> 6 layers spends at least 0.417"):
        study_tool.stacking_stages(6, 0.4)


def test_protocol_flags_are_checked(tmp_path, capsys):
    def error(message, *argv):
        with pytest.raises(SystemExit):
            study_tool.main(["--preset", "smoke", "--output-dir", str(tmp_path), *argv])
        assert message in capsys.readouterr().err
    protocol = ["--lrs", "1e-3", "2e-3", "4e-3", "--selection-seeds", "1", "--report-seeds", "2"]
    error("at least 3 LRs", "--lrs", "1e-3", "2e-3", "--selection-seeds", "1", "--report-seeds", "2")
    error("each twice the one before", "--lrs", "1e-3", "2e-3", "3e-3", "--selection-seeds", "1", "--report-seeds", "2")
    error("must not share a seed", "--lrs", "1e-3", "2e-3", "4e-3", "--selection-seeds", "1", "--report-seeds", "1")
    error("belong to the held-out protocol", "--selection-seeds", "1", "--report-seeds", "2")
    error("--frontier 0.4", "--frontier", "0.4")  # below auto:F's floor for 6 layers
    error("needs the raptr and stacking methods", *protocol, "--methods", "baseline", "raptr", "--frontier", "0.75")


def test_hold_out_carves_documents_out_of_training(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"id": f"wiki/{i}", "text": str(i)}) + "\n" for i in range(400)))
    kept, held = study_tool.hold_out(train, 0.1, tmp_path)
    kept_ids = [json.loads(line)["id"] for line in kept.read_text().splitlines()]
    held_ids = [json.loads(line)["id"] for line in held.read_text().splitlines()]
    assert sorted(kept_ids + held_ids) == sorted(f"wiki/{i}" for i in range(400)) and 20 < len(held_ids) < 60


def test_a_dense_run_trains_and_is_evaluated_at_its_depth_and_lr(tmp_path, monkeypatch):
    """The evaluation leaves the method's flags out: a dense-L run's depth must reach it all the same."""
    launched = []

    def fake_launch(preset, argv, log, jobs):
        launched.append(argv)
        records = ([{"valid_set": "valid_text_document", "val_loss": 2.0},
                    {"valid_set": "heldout_text_document", "val_loss": 2.5}] if "--skip-train" in argv else
                   [{"iteration": 4, "lm_loss": 2.0, "cumulative_flops": 1.0, "elapsed_s": 1.0, "stage": 0},
                    {"iteration": 4, "val_loss": 2.0}])
        Path(argv[argv.index("--metrics-file") + 1]).write_text("".join(json.dumps(r) + "\n" for r in records))

    monkeypatch.setattr(study_tool, "launch", fake_launch)
    run = study_tool.Run("dense-3", 1, 4, ("--num-layers", "3"), 4, 4e-3)
    data = {"tokenizer": "spm.model", "train": "train", "valid": "valid_text_document",
            "heldout": "data/heldout_text_document"}
    result = study_tool.train_and_evaluate(study_tool.PRESETS["smoke"], data, run, tmp_path / run.name, 1, False)
    assert len(launched) == 2 and "--skip-train" in launched[1]
    for argv in launched:  # the last of a repeated flag wins
        assert [v for f, v in zip(argv, argv[1:]) if f == "--num-layers"][-1] == "3"
        assert argv[argv.index("--lr") + 1] == "0.004"
    assert result["model"]["num_layers"] == 3 and result["lr"] == 4e-3 and result["heldout_val_loss"] == 2.5


def test_wsd_study_runs_are_valid_and_never_mixed_with_cosine_ones(tmp_path):
    """--lr-decay-style WSD: pretrain_raptr.py takes the flags, decaying over the last fifth; a finished
    cosine run in the output directory is not reused as a WSD one."""
    from megatron_raptr.training.arguments import parse_args

    wsd = dataclasses.replace(study_tool.PRESETS["smoke"], lr_decay_style="WSD")
    args = parse_args(study_tool.common_flags(wsd, 100) + ["--mock-data", "--tokenizer-type", "NullTokenizer",
                                                           "--vocab-size", "512"])
    assert (args.lr_decay_style, args.lr_wsd_decay_style, args.lr_wsd_decay_iters) == ("WSD", "linear", 20)
    run = study_tool.Run("baseline", 1, 100, (), 100)
    (tmp_path / "result.json").write_text(json.dumps({"flags": []}))  # cosine, before the settings were recorded
    with pytest.raises(RuntimeError, match="'lr_decay_style': 'cosine'.*give another --output-dir"):
        study_tool.train_and_evaluate(wsd, {}, run, tmp_path, 1, False)
    cosine = study_tool.PRESETS["smoke"]
    assert study_tool.train_and_evaluate(cosine, {}, run, tmp_path, 1, False) == {"flags": []}


def test_progress_reports_the_finished_runs_of_this_study_and_trains_nothing(tmp_path, monkeypatch):
    """--progress reads each finished run's result.json: this study's methods and seeds (with their role)
    under its settings, never a run of another study sharing the directory, and prepares no data."""
    def finished(name, method, seed, lr, loss, **extra):
        run_dir = tmp_path / "runs" / name
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
            {"iteration": 5, "lm_loss": loss + 1}, {"iteration": 5, "val_loss": loss + 0.5},
            {"iteration": 10, "lm_loss": loss}, {"iteration": 10, "val_loss": loss}]))
        (run_dir / "result.json").write_text(json.dumps(dict(
            {"method": method, "seed": seed, "iterations": 10, "lr": lr, "final_val_loss": loss,
             "settings": study_tool.DEFAULT_SETTINGS}, **extra)))
    finished("baseline-10it-lr0.001-s1", "baseline", 1, 1e-3, 3.0)
    finished("baseline-10it-lr0.001-s2", "baseline", 2, 1e-3, 3.2)
    finished("dense-3-10it-lr0.002-s1", "dense-3", 1, 2e-3, 3.5)
    finished("dense-3-10it-lr0.002-s21", "dense-3", 21, 2e-3, 3.6, heldout_val_loss=3.9)
    finished("raptr-10it-lr0.001-s1", "raptr", 1, 1e-3, 3.1)  # not among --methods
    finished("baseline-10it-lr0.001-s3", "baseline", 3, 1e-3, 3.1)  # not among the seeds
    finished("baseline-10it-lr0.004-s1", "baseline", 1, 4e-3, 2.9,  # another study's settings
             settings=dict(study_tool.DEFAULT_SETTINGS, lr_decay_style="WSD"))
    monkeypatch.setattr(study_tool, "prepare_data", None)  # called, it would fail
    study_tool.main(["--preset", "smoke", "--iters", "10", "--output-dir", str(tmp_path), "--methods", "baseline",
                     "--dense-depths", "3", "--lrs", "1e-3", "2e-3", "4e-3", "--selection-seeds", "1", "2",
                     "--report-seeds", "21", "--progress"])
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["plan"] == "12 selection runs, then 2 report runs"
    assert sorted((r["name"], r["role"]) for r in progress["runs"]) == [
        ("baseline-10it-lr0.001-s1", "selection"), ("baseline-10it-lr0.001-s2", "selection"),
        ("dense-3-10it-lr0.002-s1", "selection"), ("dense-3-10it-lr0.002-s21", "report")]
    assert next(r for r in progress["runs"] if r["seed"] == 2)["evals"] == [[5, 3.7], [10, 3.2]]
    table = (tmp_path / "progress.md").read_text()
    assert "| selection | baseline | 10 | 0.001 | 1 2 | 3.1000 ± 0.1414 | - |" in table
    assert "| report | dense-3 | 10 | 0.002 | 21 | 3.6000 | 3.9000 |" in table


@pytest.mark.parametrize("script", sorted((ROOT / "examples").glob("study_*.sh")), ids=lambda path: path.name)
def test_study_scripts_plan_studies_that_study_py_accepts(script, tmp_path, monkeypatch):
    """Every examples/study_*.sh hands tools/study.py flags that pass its checks: its plan, read with
    --progress (which trains nothing)."""
    text = script.read_text().replace("\\\n", " ")
    commands = re.findall(r"\.venv/bin/python tools/study\.py (.*)", text)
    assert commands, f"{script.name} runs no tools/study.py"
    monkeypatch.setattr(study_tool, "prepare_data", None)  # called, it would fail
    for command in commands:
        command = command.replace("$OUT", str(tmp_path)).replace('"$beta2"', "0.95").replace("$beta2", "0.95")
        study_tool.main([arg for arg in shlex.split(command) if arg != "$@"] + ["--progress"])
        assert "runs finished; the plan:" in next(tmp_path.rglob("progress.md")).read_text()
