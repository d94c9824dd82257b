"""tools/gpu_check.sh without a GPU: says so, runs the same checks small on the CPU, writes its figures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run is gpu_check.sh's own job")
def test_gpu_check_runs_on_cpu_and_writes_its_figures(tmp_path):
    result = subprocess.run(["bash", "tools/gpu_check.sh", "--output-dir", str(tmp_path)], cwd=ROOT,
                            env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "no CUDA GPU found" in result.stdout
    figures = json.loads((tmp_path / "gpu_check.json").read_text())
    assert figures["environment"]["device"].startswith("cpu")
    assert figures["tests"]["passed"] > 0 and "failed" not in figures["tests"]
    bench = figures["bench"]
    assert bench["path"] < bench["layers"]
    for name in ("raptr", "dense"):
        assert bench[name]["step_ms"] >= bench[name]["forward_backward_ms"] > 0
    assert bench["forward_backward_ratio"] == pytest.approx(
        bench["raptr"]["forward_backward_ms"] / bench["dense"]["forward_backward_ms"])
    end_to_end = figures["end_to_end"]
    assert end_to_end["exit_codes"] == [0, 0, 0]
    assert end_to_end["paths_equal_after_resume"] and end_to_end["max_rel_loss_diff_after_resume"] == 0.0
    assert end_to_end["final_loss"] < end_to_end["first_loss"]
    megatron_lm = figures["megatron_lm"]
    if "skipped" not in megatron_lm:  # megatron-core 0.17+
        assert megatron_lm["path_lengths"] == [2] * 4 + [4] * 4
        assert megatron_lm["final_loss"] < megatron_lm["first_loss"]
    assert "whole step" in (tmp_path / "gpu_check.txt").read_text()


def test_gpu_check_refuses_bad_arguments(tmp_path):
    for argv, message in ((["--output-dir"], "--output-dir needs a directory"),
                          ([], "--output-dir DIR is required"),
                          (["--output-dir", str(tmp_path), "--wheel-dir", str(tmp_path)], "no .whl files"),
                          (["--bogus"], "unknown argument --bogus")):
        result = subprocess.run(["bash", "tools/gpu_check.sh", *argv], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode != 0 and message in result.stderr, (argv, result.stderr)
