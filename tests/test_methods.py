"""Gradual stacking and progressive layer dropping as paths: schedules and samplers (no model)."""

import math
from collections import Counter

import numpy as np
import pytest

from megatron_raptr.methods import build_sampler
from megatron_raptr.pld import PLDSampler, PLDSchedule
from megatron_raptr.stacking import StackingSampler, StackingSchedule


def test_stacking_top_copies_the_top_layers_in_order():
    schedule = StackingSchedule.parse("6@0,9@0.33,12@0.67", 12, 300)
    assert [stage.start for stage in schedule.stages] == [0, 99, 201]
    assert schedule.growth(1) == {7: 4, 8: 5, 9: 6}  # Reddi et al.: 6 -> 9 copies layers 4-6 into 7-9
    assert schedule.growth(2) == {10: 7, 11: 8, 12: 9}
    assert schedule.new_layers(1) == (7, 8, 9)
    assert StackingSchedule.parse("2@0,4@5", 4, 10).growth(1) == {3: 1, 4: 2}  # doubling: Gong et al.
    assert schedule.expected_layer_fraction(300) == pytest.approx((99 * 6 + 102 * 9 + 99 * 12) / 300 / 12)


def test_stacking_middle_duplicates_the_middle_block_and_moves_the_layers_above():
    schedule = StackingSchedule.parse("6@0,9@10", 12, 20, copy="middle")
    # Layers 2-4 are followed by their copy (new 5-7); old 5 and 6 move up to 8 and 9.
    assert schedule.growth(1) == {5: 2, 6: 3, 7: 4, 8: 5, 9: 6}
    assert schedule.new_layers(1) == (5, 6, 7)
    assert StackingSchedule.parse("4@0,6@10", 6, 20, copy="middle").growth(1) == {4: 2, 5: 3, 6: 4}


def test_stacking_path_is_the_prefix_unscaled_and_gates_evaluation():
    sampler = build_sampler(StackingSchedule.parse("2@0,3@4,5@8", 6, 12), seed=1, layout=(3, 3))
    assert isinstance(sampler, StackingSampler)
    paths = [sampler.path(t) for t in range(12)]
    assert [p.active for p in paths] == [(1, 2)] * 4 + [(1, 2, 3)] * 4 + [(1, 2, 3, 4, 5)] * 4
    assert [p.stage for p in paths] == [0] * 4 + [1] * 4 + [2] * 4
    assert all(set(p.scales.values()) == {1.0} and p.gates_eval for p in paths)


PLD = PLDSchedule(theta_bar=0.5, gamma=0.02, num_layers=8)


@pytest.mark.parametrize("t", [0, 10, 50, 300])
def test_pld_keep_probabilities_follow_zhang_and_he(t):
    theta = (1 - 0.5) * math.exp(-0.02 * t) + 0.5
    keep = PLD.keep_probabilities(t)
    for layer in (1, 2, 5, 8):
        assert keep[layer] == pytest.approx(1 - layer / 8 * (1 - theta), rel=1e-12)
    assert keep[8] == pytest.approx(theta)
    assert list(keep.values()) == sorted(keep.values(), reverse=True)  # deeper layers dropped more
    if t == 0:
        assert set(keep.values()) == {1.0}


def test_pld_paths_scale_by_inverse_keep_and_frequencies_match():
    sampler = build_sampler(PLD, seed=3, layout=(4, 4))
    assert isinstance(sampler, PLDSampler)
    state = np.random.get_state()
    steps = range(4000)
    counts, expected, variance = Counter(), Counter(), Counter()
    for t in steps:
        path = sampler.path(t)
        keep = PLD.keep_probabilities(t)
        assert not path.gates_eval and path.stage == 0
        assert path.scales == {layer: pytest.approx(1 / keep[layer]) for layer in path.active}
        counts.update(path.active)
        for layer, p in keep.items():
            expected[layer] += p
            variance[layer] += p * (1 - p)
    assert np.all(np.random.get_state()[1] == state[1])  # global RNG untouched
    for layer in range(1, 9):
        assert abs(counts[layer] - expected[layer]) < 4 * math.sqrt(variance[layer]), layer
    assert counts[7] < counts[2]
    # A pure function of (seed, t): another sampler, other order, same paths; another seed differs.
    again = PLDSampler(PLD, seed=3)
    assert [again.path(t) for t in reversed(range(100, 200))][::-1] == [sampler.path(t) for t in range(100, 200)]
    assert [PLDSampler(PLD, seed=4).path(t).active for t in range(100, 200)] != \
        [sampler.path(t).active for t in range(100, 200)]


def test_pld_expected_layer_fraction_is_the_mean_keep_probability():
    by_hand = np.mean([sum(PLD.keep_probabilities(t).values()) for t in range(300)]) / 8
    assert PLD.expected_layer_fraction(300) == pytest.approx(by_hand, rel=1e-12)
    assert PLD.stage_index(299) == 0 and PLD.stages[0].start == 0
