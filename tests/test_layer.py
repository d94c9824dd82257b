"""Skipping is real: a path of k layers costs what a dense k-layer model costs."""

import pytest
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from torch.utils.flop_counter import FlopCounterMode

from megatron_raptr import PathSampler, PathSetter, RaptrSchedule, get_gpt_raptr_layer_spec
from megatron_raptr.flops import step_flops
from megatron_raptr.sampler import Path
from megatron_raptr.training.initialize import destroy_distributed, initialize_distributed
from tests.dense_reference import active_layers_state_dict

VOCAB, SEQ, BATCH, HIDDEN = 256, 32, 2, 64
# On a GPU machine Megatron's local attention allocates its buffers on the GPU: test there.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module", autouse=True)
def single_process_megatron():
    initialize_distributed(1, 1, seed=7)
    yield
    destroy_distributed()


def config(num_layers):
    return TransformerConfig(num_layers=num_layers, hidden_size=HIDDEN, num_attention_heads=4,
                             hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True)


def gpt(num_layers, spec):
    torch.manual_seed(0)
    return GPTModel(config(num_layers), spec, vocab_size=VOCAB, max_sequence_length=SEQ).to(DEVICE)


def batch():
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    return tokens[:, :-1], torch.arange(SEQ, device=DEVICE).expand(BATCH, SEQ), tokens[:, 1:]


def train_step(model):
    """FLOPs, saved-activation bytes and loss of one forward + backward."""
    inputs, positions, labels = batch()
    saved = []
    with FlopCounterMode(display=False) as counter, \
            torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                     lambda t: t):
        loss = model(inputs, positions, None, labels=labels).mean()
        loss.backward()
    return counter.get_total_flops(), sum(saved), loss.detach()


def path(active, scales=None):
    return Path(0, 0, tuple(active), scales or {layer: 1.0 for layer in active})


def test_path_of_k_layers_costs_a_dense_k_layer_model():
    raptr = gpt(6, get_gpt_raptr_layer_spec())
    PathSetter(raptr)(path([1, 3, 6]))
    flops, activation_bytes, _ = train_step(raptr)
    dense_flops, dense_activation_bytes, _ = train_step(gpt(3, get_gpt_layer_local_spec()))
    assert flops == dense_flops
    assert activation_bytes == dense_activation_bytes
    # The FLOPs accounting agrees with an independent count of every matmul.
    assert flops == step_flops(raptr.config, VOCAB, SEQ, BATCH * SEQ, layers=3)


def test_path_equals_a_dense_model_of_exactly_its_layers():
    """Same loss, and the same gradients for every weight, as a dense Megatron GPT whose
    layers are the active ones' (their weights copied); untouched by the skipped ones."""
    active = (1, 3, 6)
    raptr = gpt(6, get_gpt_raptr_layer_spec())
    dense = gpt(len(active), get_gpt_layer_local_spec())
    dense.load_state_dict(active_layers_state_dict(raptr.state_dict(), active))
    PathSetter(raptr)(path(active))
    *_, raptr_loss = train_step(raptr)
    *_, dense_loss = train_step(dense)
    torch.testing.assert_close(raptr_loss, dense_loss, rtol=1e-6, atol=0)
    raptr_grads = active_layers_state_dict({name: p.grad for name, p in raptr.named_parameters()}, active)
    for name, p in dense.named_parameters():
        torch.testing.assert_close(raptr_grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_skipped_layers_get_no_gradient():
    raptr = gpt(6, get_gpt_raptr_layer_spec())
    PathSetter(raptr)(path([1, 2, 6]))
    train_step(raptr)
    for layer in raptr.decoder.layers:
        grads = [p.grad for p in layer.parameters()]
        if layer.layer_number in (1, 2, 6):
            assert all(g is not None and g.abs().sum() > 0 for g in grads)
        else:
            assert all(g is None for g in grads)


def test_full_path_equals_plain_megatron_gpt():
    plain = gpt(4, get_gpt_layer_local_spec())
    raptr = gpt(4, get_gpt_raptr_layer_spec())
    raptr.load_state_dict(plain.state_dict())
    PathSetter(raptr)(PathSampler(RaptrSchedule.full_model(4), seed=3).path(0))
    *_, raptr_loss = train_step(raptr)
    *_, plain_loss = train_step(plain)
    assert torch.equal(raptr_loss, plain_loss)
    for (name, a), b in zip(raptr.named_parameters(), plain.parameters()):
        assert torch.equal(a.grad, b.grad), name


def test_eval_runs_the_full_model_unscaled():
    plain = gpt(4, get_gpt_layer_local_spec())
    raptr = gpt(4, get_gpt_raptr_layer_spec())
    raptr.load_state_dict(plain.state_dict())
    PathSetter(raptr)(path([1, 4], {1: 1.0, 4: 3.0}))
    inputs, positions, labels = batch()
    with torch.no_grad():
        expected = plain.eval()(inputs, positions, None, labels=labels)
        assert torch.equal(raptr.eval()(inputs, positions, None, labels=labels), expected)
        assert not torch.equal(raptr.train()(inputs, positions, None, labels=labels), expected)


def test_kept_layer_scales_its_residual_update():
    raptr = gpt(2, get_gpt_raptr_layer_spec())
    layer = raptr.decoder.layers[1]
    x = torch.randn(SEQ, BATCH, HIDDEN, device=DEVICE)
    with torch.no_grad():
        plain_out, _ = layer(hidden_states=x, attention_mask=None)
        layer.raptr_scale = 2.5
        scaled_out, _ = layer(hidden_states=x, attention_mask=None)
        layer.raptr_active = False
        skipped_out, _ = layer(hidden_states=x, attention_mask=None)
    torch.testing.assert_close(scaled_out - x, 2.5 * (plain_out - x))
    assert skipped_out is x


def test_plain_megatron_ddp_with_overlap_is_refused():
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_raptr import RaptrDistributedDataParallel

    model = gpt(2, get_gpt_raptr_layer_spec())
    overlap = DistributedDataParallelConfig(overlap_grad_reduce=True)
    with pytest.raises(TypeError, match="RaptrDistributedDataParallel"):
        PathSetter(DistributedDataParallel(model.config, overlap, model))
    PathSetter(RaptrDistributedDataParallel(model.config, overlap, gpt(2, get_gpt_raptr_layer_spec())))
