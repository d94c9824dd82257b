from collections import Counter

import numpy as np
import pytest

from megatron_raptr.sampler import PathSampler
from megatron_raptr.schedule import RaptrSchedule

STEPS = 4000


def make(sampling, length=6, layers=12, layout=None, scaling="inverse-keep", fixed=None):
    schedule = RaptrSchedule.parse(f"{length}@0", layers, STEPS, fixed_layers=fixed, sampling=sampling, scaling=scaling)
    return PathSampler(schedule, seed=1234, layout=layout)


@pytest.mark.parametrize("sampling", ["bernoulli", "fixed-size", "pipeline-balanced"])
def test_deterministic_pure_function_of_seed_and_iteration(sampling):
    state = np.random.get_state()
    a, b = make(sampling, layout=(6, 6)), make(sampling, layout=(6, 6))
    assert [a.path(t) for t in range(50)] == [b.path(t) for t in reversed(range(50))][::-1]
    assert len({a.path(t).active for t in range(50)}) > 10  # really random across steps
    other_seed = PathSampler(a.schedule, seed=99, layout=(6, 6))
    assert [a.path(t).active for t in range(50)] != [other_seed.path(t).active for t in range(50)]
    assert np.all(np.random.get_state()[1] == state[1])  # global RNG untouched


@pytest.mark.parametrize("sampling", ["bernoulli", "fixed-size", "pipeline-balanced"])
def test_fixed_layers_always_on_and_frequencies_match_schedule(sampling):
    sampler = make(sampling, length=6, layout=(4, 4, 4))
    counts, lengths = Counter(), []
    for t in range(STEPS):
        path = sampler.path(t)
        assert {1, 12} <= set(path.active)
        assert list(path.active) == sorted(set(path.active))
        counts.update(path.active)
        lengths.append(len(path.active))
    assert np.mean(lengths) == pytest.approx(6, abs=0.1)
    if sampling != "bernoulli":
        assert set(lengths) == {6}
    keep = sampler.keep_probabilities(0)
    assert sum(keep.values()) == pytest.approx(6)
    for layer in range(1, 13):
        assert counts[layer] / STEPS == pytest.approx(keep[layer], abs=0.035), layer
    if sampling != "pipeline-balanced":
        assert all(keep[layer] == pytest.approx(4 / 10) for layer in range(2, 12))


def test_pipeline_balanced_equal_counts_per_stage():
    sampler = make("pipeline-balanced", length=6, layout=(4, 4, 4))
    for t in range(200):
        per_stage = Counter((layer - 1) // 4 for layer in sampler.path(t).active)
        assert sorted(per_stage.values()) == [2, 2, 2]
    # 7 of 12 over 3 stages: counts 2-2-3 in some order, each stage equally often the 3.
    sampler = make("pipeline-balanced", length=7, layout=(4, 4, 4))
    big = Counter()
    for t in range(3000):
        per_stage = Counter((layer - 1) // 4 for layer in sampler.path(t).active)
        assert sorted(per_stage.values()) == [2, 2, 3]
        big.update(stage for stage, n in per_stage.items() if n == 3)
    assert all(n / 3000 == pytest.approx(1 / 3, abs=0.04) for n in big.values())


def test_uniform_sampling_can_leave_pipeline_unbalanced():
    # The reason pipeline-balanced exists: fixed-size paths often load one stage more.
    sampler = make("fixed-size", length=6, layout=(4, 4, 4))
    unbalanced = sum(
        max(Counter((layer - 1) // 4 for layer in sampler.path(t).active).values()) > 2 for t in range(200)
    )
    assert unbalanced > 100


def test_scaling_rules():
    sampler = make("bernoulli", length=6)
    path = sampler.path(3)
    assert path.scales[1] == path.scales[12] == 1.0
    assert all(path.scales[layer] == pytest.approx(10 / 4) for layer in path.active if layer not in (1, 12))
    assert set(make("bernoulli", scaling="none").path(3).scales.values()) == {1.0}
    sqrt = make("bernoulli", scaling="inverse-sqrt-keep").path(3)
    assert sqrt.active == path.active  # the rule changes scales, never the path
    assert sqrt.scales == {layer: 1.0 if layer in (1, 12) else pytest.approx((4 / 10) ** -0.5) for layer in path.active}


def test_full_model_stage_runs_every_layer_unscaled():
    schedule = RaptrSchedule.parse("2@0,4@0.5", 4, 10)
    sampler = PathSampler(schedule, seed=0)
    assert all(sampler.path(t).active == (1, 2, 3, 4) for t in range(5, 10))
    assert set(sampler.path(7).scales.values()) == {1.0}


def test_checksum_distinguishes_paths():
    sampler = make("fixed-size")
    sums = {sampler.path(t).checksum() for t in range(100)}
    assert len(sums) == 100
