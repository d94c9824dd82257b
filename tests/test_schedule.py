import pytest

from megatron_raptr.schedule import RaptrSchedule, Stage, growing_stages


def test_parse_iterations_and_fractions():
    schedule = RaptrSchedule.parse("6@0,8@0.25,10@500,12@0.75", num_layers=12, train_iters=1000)
    assert schedule.stages == (Stage(0, 6), Stage(250, 8), Stage(500, 10), Stage(750, 12))
    assert schedule.fixed_layers == (1, 12)
    assert [schedule.stage_index(t) for t in (0, 249, 250, 749, 750, 999)] == [0, 0, 1, 2, 3, 3]


def test_paper_bert_schedule_saves_a_quarter_of_layer_flops():
    schedule = RaptrSchedule.parse("6@0,8@0.25,10@0.5,12@0.75", num_layers=12, train_iters=1000)
    assert schedule.expected_layer_fraction(1000) == pytest.approx(9 / 12)
    assert schedule.stage_iterations(1000) == (250, 250, 250, 250)
    assert schedule.keep_probability(0) == pytest.approx(4 / 10)
    assert schedule.keep_probability(3) == 1.0


@pytest.mark.parametrize(
    "text, message",
    [
        ("6@10,12@20", "first stage must start at iteration 0"),
        ("6@0,8@0.5,10@0.4", "must increase"),
        ("6@0,13@0.5", "between the number of fixed layers"),
        ("1@0", "between the number of fixed layers"),
        ("6-0", "LENGTH@START"),
        ("6@0,8@1.5", "fractional START"),
        ("6@0,8@x", "'8@x'"),
        ("6@0,8@100", "--train-iters"),
    ],
)
def test_bad_schedules_name_the_flag(text, message):
    with pytest.raises(ValueError, match="--raptr-schedule") as error:
        RaptrSchedule.parse(text, num_layers=12, train_iters=100)
    assert message in str(error.value)


def test_bad_options_name_their_flags():
    with pytest.raises(ValueError, match="--raptr-fixed-layers"):
        RaptrSchedule.parse("6@0", num_layers=12, train_iters=10, fixed_layers=[0, 12])
    with pytest.raises(ValueError, match="--raptr-sampling"):
        RaptrSchedule.parse("6@0", num_layers=12, train_iters=10, sampling="uniform")
    with pytest.raises(ValueError, match="whole path lengths"):
        RaptrSchedule.parse("6.5@0", num_layers=12, train_iters=10, sampling="fixed-size")


def test_full_model_schedule_keeps_every_layer():
    schedule = RaptrSchedule.full_model(4)
    assert schedule.expected_layer_fraction(7) == 1.0
    assert schedule.keep_probability(0) == 1.0


def test_growing_stages_spend_the_fraction():
    # Equal stages from (2f - 1) L: the paper's 6-8-10-12 is 0.75 of 12 layers.
    assert growing_stages(12, 0.75, 4, 6) == "6@0,8@0.2500,10@0.5000,12@0.7500"
    assert growing_stages(12, 0.75, 2, 6) == "6@0,12@0.5000"
    for stages, first, fraction in [(4, 2, 0.75), (7, 6, 0.75), (3, 4, 0.6), (5, 1, 0.5), (4, 10, 0.95)]:
        text = growing_stages(12, fraction, stages, first)
        schedule = RaptrSchedule.parse(text, 12, 10_000, fixed_layers=())
        lengths = [stage.length for stage in schedule.stages]
        assert lengths[0] == first and lengths[-1] == 12 and lengths == sorted(set(lengths))
        assert schedule.expected_layer_fraction(10_000) == pytest.approx(fraction, abs=1e-3), text
        growing = schedule.stage_iterations(10_000)[:-1]
        assert max(growing) - min(growing) <= 1  # the growing stages last equally long


def test_auto_schedule_spends_the_budget_with_fixed_layers_kept():
    # From the two fixed layers alone; the full model from 0.45 (the study's none-fixed-first).
    schedule = RaptrSchedule.parse("auto:0.75", 12, 400)
    assert [(s.start, s.length) for s in schedule.stages] == [(0, 2), (60, 5), (120, 9), (180, 12)]
    assert RaptrSchedule.parse("auto:0.75", 12, 400, fixed_layers=()).stages[0].length == 1
    for fraction in (0.6, 0.7, 0.8, 0.9):
        for layers in (6, 12, 24, 32):
            schedule = RaptrSchedule.parse(f"auto:{fraction}", layers, 1000)
            assert schedule.stages[0].length >= len(schedule.fixed_layers)
            assert schedule.expected_layer_fraction(1000) == pytest.approx(fraction, abs=0.01)


@pytest.mark.parametrize("text, message", [
    ("auto:x", "needs a number"),
    ("auto:1", "a fraction in (0, 1)"),
    ("auto:0.4", "spends at least 0.444"),
])
def test_bad_auto_schedules_name_the_flag(text, message):
    with pytest.raises(ValueError, match="--raptr-schedule") as error:
        RaptrSchedule.parse(text, num_layers=12, train_iters=100)
    assert message in str(error.value)
