"""tools/bench_pipeline.py: the analytic slowest-stage loads, and its measured PP=2 run."""

import math

import pytest

from tests.distributed import run_distributed
from tests.test_data import load_tool


@pytest.mark.parametrize("stages, path", [(2, 12), (4, 16), (8, 16)])
def test_balanced_paths_load_the_slowest_stage_least(stages, path):
    bench = load_tool("bench_pipeline")
    balanced = bench.slowest_stage_layers(24, path, stages, "pipeline-balanced", steps=300)
    assert balanced == math.ceil(path / stages)  # every step, not only on average
    assert bench.slowest_stage_layers(24, path, stages, "fixed-size", steps=300) > balanced + 0.2


def _measure():
    return load_tool("bench_pipeline").measure(layers=4, path=2, hidden=64, seq=32, micro_batch=1, microbatches=2,
                                                steps=2)


def test_measured_run_reports_both_modes_identically_on_every_rank():
    first, second = run_distributed(_measure, 2)
    assert first == second
    assert first["pipeline-balanced"]["slowest_stage_layers"] == 1  # path 2 of 4 (fixed 1 and 4) over 2 stages
    assert all(r["step_ms"] > 0 for r in first.values())
