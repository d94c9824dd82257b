"""A diverged run, SIGTERM and a dead rank, on real 2-process launches of pretrain_raptr.py."""

from types import SimpleNamespace

from megatron_raptr.sampler import Path
from tests.distributed import run_distributed
from tests.launch import finish, torchrun, tracker, train_iterations, wait_for_iterations, worker
from tests.test_pretrain import MODEL, RAPTR, _pretrain_each, losses, train_records


def _check_each(cases):
    """For each case ((loss, gradient) of rank 0, of rank 1): the error on this rank, or None.
    A loss of None: a rank off the last pipeline stage, which has no loss."""
    import torch
    import torch.distributed as dist

    from megatron_raptr.training.initialize import initialize_distributed
    from megatron_raptr.training.loop import Trainer, TrainingStopped

    initialize_distributed(1, 1)
    messages = []
    for values_by_rank in cases:
        loss, grad = values_by_rank[dist.get_rank()]
        trainer = SimpleNamespace(
            args=SimpleNamespace(fp16=False),
            model=[SimpleNamespace(buffers=[SimpleNamespace(grad_data=torch.tensor([1.0, grad]))],
                                   expert_parallel_buffers=[])],
        )  # fmt: skip
        losses = [] if loss is None else [{"lm loss": torch.tensor(loss)}]
        try:
            Trainer._check_finite(trainer, losses, Path(6, 1, (1, 3), {}))
            messages.append(None)
        except TrainingStopped as error:
            messages.append(str(error))
    return messages


def test_nan_or_inf_on_one_rank_stops_every_rank_with_one_message():
    nan, inf = float("nan"), float("inf")
    fine, loss, grad, both = zip(*run_distributed(_check_each, 2, [
        [(2.0, 1.0), (2.0, 1.0)],
        [(nan, 1.0), (2.0, 1.0)],
        [(None, inf), (2.0, 1.0)],
        [(None, 1.0), (inf, nan)],
    ]))
    assert fine == (None, None)
    for messages, what in ((loss, "loss"), (grad, "gradients"), (both, "loss and gradients")):
        assert messages[0] == messages[1]
        assert f"NaN or Inf in the {what} at iteration 7 (stage 1, path layers [1, 3])" in messages[0]


def test_diverged_run_exits_nonzero_before_saving_the_broken_state(tmp_path):
    """--lr 1e6 under PP=2 (the loss lives on the second stage only), saving every iteration."""
    metrics, save = tmp_path / "metrics.jsonl", tmp_path / "ckpt"
    job = torchrun(*MODEL, *RAPTR, "--lr", "1e6", "--train-iters", "40", "--pipeline-model-parallel-size", "2",
                   "--save", save, "--save-interval", "1", "--metrics-file", metrics)
    output = finish(job, 120)
    assert job.returncode != 0, output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output
    last_good = train_iterations(metrics)[-1]
    assert f"NaN or Inf in the loss and gradients at iteration {last_good + 1} (stage " in errors[0]
    assert "path layers [1, " in errors[0]
    assert tracker(save) == last_good and not (save / f"iter_{last_good + 1:07d}").exists()
    assert "megatron_raptr" not in output  # no traceback from the training processes (torchrun prints its own)


def test_sigterm_to_one_rank_saves_on_every_rank_and_resuming_repeats_the_run(tmp_path):
    """Only rank 0 gets SIGTERM; rank 1 (the last, which writes the metrics) must stop with it.
    Saves are asynchronous, every 2 steps: the one SIGTERM triggers must still be committed before exit."""
    save, iters = tmp_path / "ckpt", 60
    common = [*MODEL, *RAPTR, "--train-iters", str(iters), "--save", str(save)]
    job = torchrun(*common, "--exit-signal-handler", "--async-save", "--save-interval", "2",
                   "--metrics-file", tmp_path / "interrupted.jsonl")
    wait_for_iterations(job, tmp_path / "interrupted.jsonl", 3)
    worker(job, 0).terminate()
    output = finish(job, 60)
    assert job.returncode == 0, output
    stopped = train_iterations(tmp_path / "interrupted.jsonl")[-1]
    assert stopped < iters and tracker(save) == stopped
    assert f"exiting at iteration {stopped} (SIGTERM received)" in output

    run_distributed(_pretrain_each, 2, [
        common + ["--metrics-file", str(tmp_path / "resumed.jsonl"), "--load", str(save)],
        MODEL + RAPTR + ["--train-iters", str(iters), "--metrics-file", str(tmp_path / "uninterrupted.jsonl")],
    ])
    interrupted, resumed, reference = (train_records(tmp_path, name)
                                       for name in ("interrupted", "resumed", "uninterrupted"))  # fmt: skip
    assert [r["iteration"] for r in resumed] == list(range(stopped + 1, iters + 1))
    assert [r["active_layers"] for r in interrupted + resumed] == [r["active_layers"] for r in reference]
    assert losses(interrupted + resumed) == losses(reference)


def test_a_killed_rank_ends_the_job_within_a_minute_naming_it(tmp_path):
    """The survivor runs --exit-signal-handler, so torchrun's SIGTERM alone would not stop it."""
    metrics = tmp_path / "metrics.jsonl"
    job = torchrun(*MODEL, "--train-iters", "2000", "--exit-signal-handler", "--save", tmp_path / "ckpt",
                   "--metrics-file", metrics)
    wait_for_iterations(job, metrics, 2)
    victim = worker(job, 1)
    victim.kill()
    output = finish(job, 60)
    assert job.returncode != 0
    assert f"Signal 9 (SIGKILL) received by PID {victim.pid}" in output, output
