"""tools/bench_pipeline.py: the analytic slowest-stage loads, and its measured PP=2 run."""

import math

import pytest

from tests.distributed import run_distributed
from tests.test_data import load_tool


@pytest.mark.parametrize("stages, virtual_stages, path", [(2, 1, 12), (4, 1, 16), (8, 1, 16), (4, 2, 16), (2, 4, 15)])
def test_balanced_paths_load_the_slowest_stage_least(stages, virtual_stages, path):
    bench = load_tool("bench_pipeline")
    balanced = bench.slowest_stage_layers(24, path, stages, "pipeline-balanced", virtual_stages, steps=300)
    assert balanced == math.ceil(path / stages)  # every step, not only on average
    assert bench.slowest_stage_layers(24, path, stages, "fixed-size", virtual_stages, steps=300) > balanced + 0.2


def _measure():
    from megatron.core import parallel_state

    bench = load_tool("bench_pipeline")
    plain = bench.measure(layers=4, path=2, hidden=64, seq=32, micro_batch=1, microbatches=2, steps=2)
    parallel_state.destroy_model_parallel()
    return plain, bench.measure(layers=4, path=2, hidden=64, seq=32, micro_batch=1, microbatches=2, steps=2,
                                virtual_stages=2)


def test_measured_run_reports_both_modes_identically_on_every_rank():
    first, second = run_distributed(_measure, 2)
    assert first == second
    for result in first:  # without and with 2 virtual stages per rank
        assert result["pipeline-balanced"]["slowest_stage_layers"] == 1  # path 2 of 4 (fixed 1 and 4) over 2 ranks
        assert all(r["step_ms"] > 0 for r in result.values())
