"""tools/bench_dp.py: the skip benchmark's saved share under DP=1 and DP=2, end to end."""

import json
import subprocess
import sys

from tests.launch import ROOT


def test_rows_compare_each_data_parallel_run_with_dp1(tmp_path):
    figures = tmp_path / "dp.json"
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_dp.py"), "--settings", "ddp", "--json", figures,
         "--layers", "4", "--path", "2", "--hidden-size", "64", "--seq-length", "32", "--micro-batch-size", "1",
         "--vocab-size", "512", "--steps", "2"],
        capture_output=True, text=True, timeout=600, check=True,
    ).stdout
    rows = json.loads(figures.read_text())
    assert [(r["row"], r["data_parallel_size"]) for r in rows] == [
        ("DP=1", 1), ("DP=2", 2), ("DP=2, every bucket reduced", 2)]
    assert "--no-raptr-skip-grad-comm" in rows[2]["megatron_args"]
    for r in rows:
        full, raptr, dense = (r[name]["step_ms"] for name in ("full", "raptr", "dense"))
        assert r["step_saved_share"] == (full - raptr) / (full - dense)
        assert f"{r['step_saved_share']:6.2f}" in out
    assert f"{100 * (rows[1]['step_saved_share'] - rows[0]['step_saved_share']):+7.1f}p" in out
