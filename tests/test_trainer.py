"""The trainer trains what it reports, checked against plain Megatron-Core computations
from the same weights and batches (one process)."""

import dataclasses
import math

import pytest
import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_raptr import get_gpt_raptr_layer_spec
from megatron_raptr.training import data
from megatron_raptr.training.arguments import parse_args
from megatron_raptr.training.initialize import destroy_distributed, initialize_distributed
from megatron_raptr.training.loop import TrainState, build_trainer
from tests.dense_reference import active_layers_state_dict

MODEL = ("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --micro-batch-size 2 "
         "--global-batch-size 4 --train-iters 3 --lr 1e-3 --lr-decay-style constant --hidden-dropout 0 "
         "--attention-dropout 0 --mock-data --tokenizer-type NullTokenizer --vocab-size 500 --eval-iters 1 "
         "--seed 5").split()


@pytest.fixture(scope="module", autouse=True)
def single_process_megatron():
    initialize_distributed(1, 1, seed=5)
    yield
    destroy_distributed()


def build(*argv, base=MODEL):
    """Parsed arguments, trainer and (train, valid) datasets of the model family `base` names."""
    args = parse_args(base + list(argv))
    trainer, tokenizer = build_trainer(args)
    train, valid = trainer.family.build_datasets(args, tokenizer)
    return args, trainer, train, valid


def microbatches(args, dataset, count):
    iterator = data.build_data_iterator(dataset, args.micro_batch_size, 0, 1, consumed_samples=0)
    return [next(iterator) for _ in range(count)]


def plain_gpt(trainer, args, num_layers, spec=None):
    config = dataclasses.replace(trainer.config, num_layers=num_layers)
    return GPTModel(config, spec or get_gpt_layer_local_spec(), vocab_size=args.padded_vocab_size,
                    max_sequence_length=args.seq_length, share_embeddings_and_output_weights=True)


def model_loss(model, batch):
    """Masked mean of the per-token loss, as Megatron-LM's GPT loss."""
    per_token = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])
    mask = batch["loss_mask"].float()
    return (per_token.float() * mask).sum() / mask.sum()


def mean_loss(model, batches):
    return torch.stack([model_loss(model, batch) for batch in batches]).mean().item()


def weights(trainer):
    return {name: value.clone() if torch.is_tensor(value) else value  # None: layers' _extra_state
            for name, value in trainer.model[0].module.state_dict().items()}


def test_training_step_runs_exactly_the_reported_path():
    """The step's loss is that of a dense Megatron GPT made of the reported layers, and the
    optimizer leaves the other layers exactly as they were (zero gradient, no weight decay)."""
    args, trainer, train, _ = build("--raptr-schedule", "2@0", "--raptr-sampling", "fixed-size",
                                    "--raptr-fixed-layers", "--raptr-scaling", "none", "--weight-decay", "0")
    before = weights(trainer)
    record = trainer.train_step(TrainState(), data.build_data_iterator(train, args.micro_batch_size, 0, 1, 0))
    active = record["active_layers"]
    assert len(active) == 2
    dense = plain_gpt(trainer, args, len(active))
    dense.load_state_dict(active_layers_state_dict(before, active))
    assert record["lm_loss"] == pytest.approx(mean_loss(dense, microbatches(args, train, args.num_microbatches)),
                                              rel=1e-6)
    after = weights(trainer)
    for layer in range(1, 5):
        prefix = f"decoder.layers.{layer - 1}."
        changed = [not torch.equal(before[n], after[n]) for n in before if n.startswith(prefix) and "weight" in n]
        assert all(changed) if layer in active else not any(changed), (layer, active)


def test_training_step_scales_the_kept_layers_and_validation_runs_the_full_model_unscaled():
    args, trainer, train, valid = build("--raptr-schedule", "3@0", "--raptr-sampling", "fixed-size",
                                        "--raptr-scaling", "inverse-keep")
    path = trainer.runtime.sampler.path(0)
    assert sorted(set(path.scales.values())) == [1.0, 2.0]  # one of the two free layers, kept with p = 1/2
    before = weights(trainer)
    record = trainer.train_step(TrainState(), data.build_data_iterator(train, args.micro_batch_size, 0, 1, 0))
    gated = plain_gpt(trainer, args, 4, get_gpt_raptr_layer_spec())
    gated.load_state_dict(before)
    for layer in gated.decoder.layers:  # set by hand, not by the trainer's PathSetter
        layer.raptr_active = layer.layer_number in path.active
        layer.raptr_scale = path.scales.get(layer.layer_number, 1.0)
    batches = microbatches(args, train, args.num_microbatches)
    assert record["lm_loss"] == pytest.approx(mean_loss(gated, batches), rel=1e-6)
    unscaled = plain_gpt(trainer, args, 3)
    unscaled.load_state_dict(active_layers_state_dict(before, path.active))
    assert record["lm_loss"] != pytest.approx(mean_loss(unscaled, batches), rel=1e-5)

    # The trainer's model is still gated by that path; validation must not be.
    full = plain_gpt(trainer, args, 4).eval()
    full.load_state_dict(weights(trainer))
    with torch.no_grad():
        expected = mean_loss(full, microbatches(args, valid, args.eval_iters * args.num_microbatches))
    assert trainer.evaluate(valid) == pytest.approx(expected, rel=1e-6)


def test_baseline_trains_as_plain_megatron_core():
    """Three baseline steps against Megatron's own DDP, optimizer and schedule on a plain GPT."""
    args, trainer, train, _ = build()
    model = plain_gpt(trainer, args, 4)
    model.load_state_dict(weights(trainer))
    config = model.config
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.lr, weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, clip_grad=args.clip_grad), [ddp])
    config.no_sync_func, config.finalize_model_grads_func = ddp.no_sync, finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss

    def forward_step(iterator, module):
        batch = next(iterator)
        return model_loss(module, batch), lambda loss: (loss, {"loss": loss.detach().clone()})

    batches = iter(microbatches(args, train, args.train_iters * args.num_microbatches))
    expected = []
    for _ in range(args.train_iters):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=batches, model=[ddp],
            num_microbatches=args.num_microbatches, seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size, forward_only=False)
        optimizer.step()
        expected.append(torch.stack([o["loss"] for o in outputs]).mean().item())

    state, iterator = TrainState(), data.build_data_iterator(train, args.micro_batch_size, 0, 1, 0)
    losses = [trainer.train_step(state, iterator)["lm_loss"] for _ in range(args.train_iters)]
    assert losses == pytest.approx(expected, rel=1e-5)
    assert losses[-1] < losses[0]


def test_causal_attention_needs_no_mask_from_the_data():
    """The data carries no attention mask (tests/test_data.py); the model's causal attention then
    masks exactly as the dense causal mask did."""
    args, trainer, train, _ = build()
    batch = microbatches(args, train, 1)[0]
    assert "attention_mask" not in batch
    causal = torch.triu(torch.ones(1, 1, args.seq_length, args.seq_length, dtype=torch.bool), diagonal=1)
    model = trainer.model[0].eval()
    with torch.no_grad():
        assert model_loss(model, batch) == model_loss(model, dict(batch, attention_mask=causal))
        leaky = torch.zeros_like(causal)  # no mask at all: the loss changes, so the comparison means something
        assert model_loss(model, batch) != model_loss(model, dict(batch, attention_mask=leaky))


def wsd_lr(step, lr, min_lr, warmup, decay_iters, wsd_iters, style):
    """WSD written out: warmup from 0 to lr, stable at lr, then the last wsd_iters steps of
    decay_iters fall to min_lr along `style`; min_lr after."""
    if step < warmup:
        return lr * step / warmup
    stable_until = decay_iters - wsd_iters
    if step <= stable_until:
        return lr
    x = min(1.0, (step - stable_until) / wsd_iters)  # how far along the decay
    left = {"linear": 1 - x, "cosine": (1 + math.cos(math.pi * x)) / 2, "exponential": 2 * 0.5 ** x - 1,
            "minus_sqrt": 1 - math.sqrt(x)}[style]
    return min_lr + (lr - min_lr) * left


@pytest.mark.parametrize("style, method", [("exponential", []), ("linear", []), ("cosine", []),
                                           ("minus_sqrt", ["--raptr-schedule", "2@0,4@0.5"])])
def test_records_show_the_wsd_learning_rate(style, method):
    """Ten steps: 2 of warmup, 2 stable, the 4 decaying ones that end --lr-decay-iters 8, then --min-lr."""
    args, trainer, train, _ = build(
        "--train-iters", "10", "--lr-decay-style", "WSD", "--lr-wsd-decay-style", style, "--lr-wsd-decay-iters", "4",
        "--lr-warmup-iters", "2", "--lr-decay-iters", "8", "--min-lr", "1e-4", *method)
    state, iterator = TrainState(), data.build_data_iterator(train, args.micro_batch_size, 0, 1, 0)
    lrs = [trainer.train_step(state, iterator)["lr"] for _ in range(args.train_iters)]
    assert lrs == pytest.approx([wsd_lr(step, 1e-3, 1e-4, 2, 8, 4, style) for step in range(10)], rel=1e-12, abs=0)
    assert lrs[2:5] == [1e-3] * 3 and lrs[8:] == pytest.approx([1e-4] * 2)
