"""Stage hooks are called on entering each stage, also for the stage a resumed run is in."""

import json

from megatron_raptr.hooks import StageHook, StageLRRewarmup
from megatron_raptr.schedule import RaptrSchedule
from tests.distributed import run_distributed
from tests.test_pretrain import MODEL, RAPTR, _pretrain_each


class RecordStages(StageHook):
    def __init__(self, path):
        self.path = path

    def on_stage_start(self, schedule, stage, iteration):
        with open(self.path, "a") as f:
            f.write(json.dumps([stage, iteration]) + "\n")


def test_hook_sees_every_stage_entry(tmp_path):
    record = tmp_path / "stages.jsonl"
    ckpt = str(tmp_path / "ckpt")
    argv = MODEL + RAPTR + ["--train-iters", "8", "--save", ckpt, "--load", ckpt]
    run_distributed(_pretrain_each, 1, [argv + ["--exit-interval", "3"], argv], [RecordStages(str(record))])
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    # First launch: stage 0 at 0; second launch resumes at 3 in stage 0, then stage 1 at 4.
    assert calls == [[0, 0], [0, 3], [1, 4]]


def test_lr_rewarmup_scale():
    schedule = RaptrSchedule.parse("2@0,3@10", num_layers=4, train_iters=20)
    hook = StageLRRewarmup(4)
    assert [hook.lr_scale(schedule, t) for t in (0, 9, 10, 11, 13, 14)] == [1.0, 1.0, 0.25, 0.5, 1.0, 1.0]
