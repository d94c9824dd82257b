"""End-to-end runs of pretrain_raptr's loop on 1-2 CPU processes (gloo)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_raptr.training.arguments import parse_args
from megatron_raptr.training.initialize import free_port, megatron_fallbacks
from tests.distributed import run_distributed

MODEL = ("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
         "--micro-batch-size 2 --global-batch-size 8 --lr 1e-3 --lr-warmup-iters 2 "
         "--hidden-dropout 0 --attention-dropout 0 --mock-data --tokenizer-type NullTokenizer --vocab-size 512 "
         "--log-interval 4 --eval-interval 4 --eval-iters 1 --seed 11").split()
RAPTR = ["--raptr-schedule", "2@0,3@0.5", "--raptr-sampling", "fixed-size"]


def _pretrain_each(argvs, hooks=None):
    """Several runs in one process group, as separate launches would do them."""
    from megatron.core import parallel_state

    from megatron_raptr.training.loop import pretrain

    for argv in argvs:
        pretrain(argv, hooks=hooks)
        parallel_state.destroy_model_parallel()


def records(tmp_path, name):
    return [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]


def train_records(tmp_path, name):
    return [r for r in records(tmp_path, name) if "lm_loss" in r]


def run(tmp_path, name, extra, world_size=2, iters=8):
    argv = MODEL + ["--train-iters", str(iters), "--metrics-file", str(tmp_path / f"{name}.jsonl")] + extra
    run_distributed(_pretrain_each, world_size, [argv])
    return train_records(tmp_path, name), [r for r in records(tmp_path, name) if "val_loss" in r]


def losses(records):
    return [r["lm_loss"] for r in records]


def test_metrics_records_have_the_documented_fields(tmp_path):
    train, evals = run(tmp_path, "fields", RAPTR + ["--raptr-verify-sync", "1", "--raptr-stage-warmup-iters", "2"],
                       world_size=1)
    assert [r["iteration"] for r in train] == list(range(1, 9))
    assert set(train[0]) >= {"iteration", "method", "stage", "path_length", "active_layers", "lm_loss", "lr",
                             "grad_norm", "tokens", "step_flops", "cumulative_flops", "elapsed_s"}
    assert {r["method"] for r in train} == {"raptr"}
    assert [r["path_length"] for r in train] == [2] * 4 + [3] * 4
    assert all({1, 4} <= set(r["active_layers"]) for r in train)
    assert train[0]["step_flops"] < train[-1]["step_flops"]
    assert train[-1]["cumulative_flops"] == pytest.approx(sum(r["step_flops"] for r in train))
    assert [r["iteration"] for r in evals] == [4, 8]
    assert all(set(r) == {"iteration", "method", "val_loss", "val_ppl", "evaluated_layers"} for r in evals)
    assert all(r["evaluated_layers"] == [1, 2, 3, 4] for r in evals)  # RaPTr evaluates the full model
    # Megatron's linear decay after 2 warm-up steps to 0 at step 8: step t trains at 1e-3 * (8 - t) / 6;
    # the stage starting at step 4 re-warms over 2 steps.
    assert [r["lr"] for r in train[2:]] == pytest.approx([1e-3 * (8 - t) / 6 * (0.5 if t == 4 else 1)
                                                          for t in range(2, 8)])


def test_baseline_equals_full_model_schedule_and_bf16_tracks_fp32(tmp_path):
    """(The baseline against plain Megatron-Core training: tests/test_trainer.py.)"""
    def argv(name, *extra):
        return MODEL + ["--train-iters", "8", "--metrics-file", str(tmp_path / f"{name}.jsonl"), *extra]

    scaled = RAPTR + ["--raptr-scaling", "inverse-keep"]
    run_distributed(_pretrain_each, 2, [argv("baseline"), argv("full", "--raptr-schedule", "4@0"),
                                        argv("raptr", *scaled), argv("raptr-bf16", *scaled, "--bf16")])
    baseline, full, raptr, bf16 = (train_records(tmp_path, name)
                                   for name in ("baseline", "full", "raptr", "raptr-bf16"))
    assert losses(baseline) == losses(full)
    assert all(r["path_length"] == 4 for r in baseline)
    # From step 5 one of the two middle layers is kept with p = 1/2: its update is scaled by 2.
    assert [r["active_layers"] for r in bf16] == [r["active_layers"] for r in raptr]
    assert losses(bf16) == pytest.approx(losses(raptr), rel=0.02)


def test_overlapped_grad_reduce_and_param_gather_with_distributed_optimizer_match_plain_ddp(tmp_path):
    """With the parameter all-gather overlapped with the next forward, the checkpoint saved right
    after the last step (no evaluation, whose forward would gather) must hold every rank's update."""
    plain, plain_evals = run(tmp_path, "plain", RAPTR)
    overlapped, _ = run(tmp_path, "overlap", RAPTR + ["--overlap-grad-reduce", "--use-distributed-optimizer"])
    gathered, _ = run(tmp_path, "param-gather", RAPTR + [
        "--overlap-grad-reduce", "--use-distributed-optimizer", "--overlap-param-gather",
        "--save", str(tmp_path / "ckpt"), "--eval-iters", "0"])
    for run_records in (overlapped, gathered):
        assert [r["active_layers"] for r in plain] == [r["active_layers"] for r in run_records]
        assert losses(run_records) == pytest.approx(losses(plain), rel=1e-6)
    _, reloaded = run(tmp_path, "reloaded", RAPTR + ["--load", str(tmp_path / "ckpt"), "--skip-train",
                                                     "--use-distributed-optimizer"])
    assert reloaded[0]["val_loss"] == pytest.approx(plain_evals[-1]["val_loss"], rel=1e-6)


def test_resume_repeats_the_run_under_every_layout(tmp_path):
    """Train 4 of 8 iterations under TP=1/PP=1, save, continue under each layout."""
    common = MODEL + RAPTR + ["--train-iters", "8"]
    ckpt = str(tmp_path / "ckpt")

    def argv(name, *extra):
        return common + ["--metrics-file", str(tmp_path / f"{name}.jsonl"), *extra]

    # Layers 1 and 2 only: the second pipeline stage runs no layer at all.
    first_stage_only = ["--raptr-schedule", "2@0", "--raptr-fixed-layers", "1", "2"]
    run_distributed(_pretrain_each, 1, [
        argv("uninterrupted"),
        argv("first-half", "--save", ckpt, "--exit-interval", "4"),
        argv("resumed", "--load", ckpt),
        argv("first-stage-only", "--load", ckpt, *first_stage_only),
    ])
    run_distributed(_pretrain_each, 2, [
        argv("tp2", "--load", ckpt, "--tensor-model-parallel-size", "2", "--sequence-parallel",
             "--recompute-granularity", "selective", "--raptr-verify-sync", "1"),
        argv("pp2", "--load", ckpt, "--pipeline-model-parallel-size", "2", "--recompute-granularity", "full",
             "--raptr-verify-sync", "1"),
        argv("dp2", "--load", ckpt, "--overlap-grad-reduce", "--raptr-verify-sync", "1"),
        argv("first-stage-only-pp2", "--load", ckpt, "--pipeline-model-parallel-size", "2", *first_stage_only),
    ])

    reference = train_records(tmp_path, "uninterrupted")
    assert [r["iteration"] for r in train_records(tmp_path, "first-half")] == [1, 2, 3, 4]
    assert losses(train_records(tmp_path, "first-half")) == losses(reference[:4])
    resumed = train_records(tmp_path, "resumed")
    assert [r["iteration"] for r in resumed] == [5, 6, 7, 8]
    assert [r["active_layers"] for r in resumed] == [r["active_layers"] for r in reference[4:]]
    assert losses(resumed) == losses(reference[4:])
    assert resumed[-1]["cumulative_flops"] == reference[-1]["cumulative_flops"]
    for layout in ("tp2", "pp2", "dp2"):
        continued = train_records(tmp_path, layout)
        assert [r["active_layers"] for r in continued] == [r["active_layers"] for r in reference[4:]], layout
        assert losses(continued) == pytest.approx(losses(reference[4:]), rel=2e-5), layout
    edge = train_records(tmp_path, "first-stage-only")
    assert all(r["active_layers"] == [1, 2] for r in edge)
    assert losses(train_records(tmp_path, "first-stage-only-pp2")) == pytest.approx(losses(edge), rel=2e-5)


@pytest.mark.parametrize("pp, flags", [
    (3, ["--num-layers", "6", "--raptr-schedule", "4@0", "--raptr-fixed-layers", "1,2,5,6"]),  # middle stage idle
    (2, ["--raptr-schedule", "2@0", "--raptr-fixed-layers", "3,4"]),  # first stage idle
])
def test_idle_pipeline_stage_with_deallocated_pipeline_outputs(tmp_path, pp, flags):
    """A stage whose layers are all skipped, with Megatron freeing every sent output's storage
    (deallocate_pipeline_outputs, on under PP as in Megatron-LM): a middle stage would send on the
    tensor it received, so freeing the output would free its input; the first stage sends its
    embeddings. From one checkpoint, the pipeline trains as one process does."""
    ckpt = str(tmp_path / "ckpt")

    def argv(name, *extra):
        return MODEL + flags + ["--train-iters", "4", "--metrics-file", str(tmp_path / f"{name}.jsonl"), *extra]

    run_distributed(_pretrain_each, 1, [argv("start", "--save", ckpt, "--exit-interval", "1"),
                                        argv("reference", "--load", ckpt)])
    run_distributed(_pretrain_each, pp, [argv("piped", "--load", ckpt, "--pipeline-model-parallel-size", str(pp))])
    piped = train_records(tmp_path, "piped")
    assert [r["active_layers"] for r in piped] == [[int(layer) for layer in flags[-1].split(",")]] * 3
    assert losses(piped) == pytest.approx(losses(train_records(tmp_path, "reference")), rel=2e-5)


def test_pipeline_balanced_paths_load_every_pipeline_stage_equally(tmp_path):
    train, _ = run(tmp_path, "balanced", ["--raptr-schedule", "3@0,5@0.5", "--raptr-sampling", "pipeline-balanced",
                                          "--pipeline-model-parallel-size", "2", "--num-layers", "6",
                                          "--raptr-verify-sync", "1"])
    assert [r["path_length"] for r in train] == [3] * 4 + [5] * 4
    for record in train:
        first = sum(layer <= 3 for layer in record["active_layers"])
        assert abs(first - (record["path_length"] - first)) <= 1, record["active_layers"]


def test_command_line_names_megatron_fallbacks_once(tmp_path):
    """Without TE/Apex, Megatron-Core warns from several modules in each process; the trainer says it in one line."""
    script = Path(__file__).resolve().parents[1] / "pretrain_raptr.py"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
              "--master-port", str(free_port())]
    result = subprocess.run([*launch, str(script), *MODEL, "--train-iters", "3"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "not installed" not in output
    unfused = parse_args(MODEL + ["--train-iters", "3"]).unfused
    assert output.count("Megatron-Core uses: ") == (1 if megatron_fallbacks(unfused) else 0)
    assert all(fused in output for fused in unfused)


def test_process_group_is_torn_down_before_interpreter_exit():
    """Left to interpreter finalization, gloo's worker threads can abort a job that succeeded (SIGABRT).
    A handler registered before initialization runs after ours (atexit is last in, first out)."""
    code = ("import atexit, torch.distributed as dist\n"
            "atexit.register(lambda: print('initialized at exit:', dist.is_initialized()))\n"
            "from megatron_raptr.training.initialize import initialize_distributed\n"
            "initialize_distributed(1, 1, seed=1)\n"
            "print('initialized:', dist.is_initialized())\n")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "initialized: True" in result.stdout and "initialized at exit: False" in result.stdout, result.stdout
