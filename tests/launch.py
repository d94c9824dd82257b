"""For tests that launch pretrain_raptr.py as real processes (torchrun, the example scripts)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def torchrun(*argv):
    """pretrain_raptr.py on 2 processes under torchrun; stdout and stderr together."""
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "pretrain_raptr.py"), *map(str, argv)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def finish(job: subprocess.Popen, timeout_s: float) -> str:
    """The job's output once it ends; a job still running after `timeout_s` is killed, with
    every process under it, and fails the test."""
    try:
        return job.communicate(timeout=timeout_s)[0]
    except subprocess.TimeoutExpired:
        for process in [*psutil.Process(job.pid).children(recursive=True), job]:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        raise AssertionError(f"still running after {timeout_s} s:\n{job.communicate()[0]}") from None


def train_iterations(metrics: Path):
    if not metrics.exists():
        return []
    return [record["iteration"] for record in map(json.loads, metrics.read_text().splitlines())
            if "lm_loss" in record]  # fmt: skip


def wait_for_iterations(job: subprocess.Popen, metrics: Path, count: int, timeout_s: float = 120) -> None:
    """Returns once `metrics` has `count` training records; fails, ending the job, when the job
    ends first or takes longer."""
    deadline = time.monotonic() + timeout_s
    while len(train_iterations(metrics)) < count:
        if job.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no {count} iterations in {metrics}:\n{finish(job, 0)}")
        time.sleep(0.05)


def worker(job: subprocess.Popen, rank: int) -> psutil.Process:
    """The training process of `rank` under the torchrun `job`."""
    for child in psutil.Process(job.pid).children(recursive=True):
        if child.environ().get("RANK") == str(rank):
            return child
    raise AssertionError(f"no rank {rank} under torchrun")


def tracker(save: Path) -> int:
    """The iteration of the latest complete checkpoint under `save`."""
    return int((save / "latest_checkpointed_iteration.txt").read_text())
