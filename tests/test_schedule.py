import pytest

from megatron_raptr.schedule import RaptrSchedule, Stage


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
