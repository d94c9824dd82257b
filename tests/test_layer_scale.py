"""A kept layer's scale s multiplies its update u: y = x + s * u, with u never a difference of rounded tensors."""

import dataclasses

import pytest
import torch
from megatron.core import tensor_parallel
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp

from megatron_raptr import get_gpt_raptr_layer_spec
from megatron_raptr.training.initialize import destroy_distributed, initialize_distributed

VOCAB, SEQ, BATCH, HIDDEN = 64, 32, 2, 64


@pytest.fixture(scope="module", autouse=True)
def single_process_megatron():
    initialize_distributed(1, 1, seed=7)
    yield
    destroy_distributed()


def gpt(spec, dtype=torch.float32, dropout=0.0, **config):
    torch.manual_seed(0)
    config = TransformerConfig(num_layers=2, hidden_size=HIDDEN, num_attention_heads=4, hidden_dropout=dropout,
                               attention_dropout=dropout, use_cpu_initialization=True,
                               bf16=dtype == torch.bfloat16, params_dtype=dtype, **config)
    # Torch norms take no params_dtype: cast the whole model, as Megatron's Float16Module does.
    return GPTModel(config, spec, vocab_size=VOCAB, max_sequence_length=SEQ).to(dtype)


def reset_rng():
    """The same RNG states every time: hidden dropout's (torch's) and attention dropout's (the tracker's)."""
    torch.manual_seed(5)
    tensor_parallel.model_parallel_cuda_manual_seed(5)


def run(layer, x, scale):
    """The layer's output at this scale, from a fixed RNG state (the same dropout masks every time)."""
    reset_rng()
    layer.raptr_scale = scale
    return layer(hidden_states=x, attention_mask=None)[0]


def ulps(error, reference, dtype):
    """|error| in units of dtype's spacing at each reference value (one correct rounding: at most 1/2)."""
    _, exponent = torch.frexp(reference)  # reference = m * 2**exponent, 1/2 <= |m| < 1
    return (error.abs() / (torch.finfo(dtype).eps * torch.ldexp(torch.ones_like(reference), exponent - 1))).float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.5, 3.0])
def test_half_precision_scaled_update_is_rounded_once(scale, dtype):
    """|x| ~ 100 |u|: against an fp32 reference of the same weights, the output is one rounding of
    x + s * u away; lerp(x, layer(x), s), the update taken back out of the rounded output, is not."""
    layer = gpt(get_gpt_raptr_layer_spec(), dtype).decoder.layers[1]
    fp32_layer = gpt(get_gpt_raptr_layer_spec()).decoder.layers[1]
    fp32_layer.load_state_dict(layer.state_dict())  # copied into fp32
    direction = torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        update = run(fp32_layer, direction, 1.0) - direction  # pre-LN: u does not depend on |x|
        # |x| between 100 and ~500 times u's root mean square, never near 0 (where spacings vanish).
        x = (direction.sign() * (1 + direction.abs()) * 100 * update.pow(2).mean().sqrt()).to(dtype)
        reference = x.double() + scale * (run(fp32_layer, x.float(), 1.0).double() - x.double())
        error = ulps(run(layer, x, scale).double() - reference, reference, dtype)
        lerp_error = ulps(torch.lerp(x, run(layer, x, 1.0), scale).double() - reference, reference, dtype)
    # One correct rounding: at most 1/2 a spacing, 1/4 on average; the half-precision sublayers' own
    # error in u adds little (|u| << |x|). Measured: max 0.52-0.55, mean 0.25.
    assert error.max() <= 0.6
    assert error.mean() <= 0.3
    # The old way fails both bounds: layer(x)'s rounding error comes back multiplied by s.
    # Measured: max 1.9-2.0 / 5.3-5.6, mean 0.52-0.58 / 0.90-1.0 at s = 1.5 / 3.
    assert lerp_error.max() > 1.0
    assert lerp_error.mean() > 1.8 * error.mean()


def test_unit_scale_is_megatrons_layer_bit_for_bit():
    """bf16 with dropout: output and gradients equal a plain TransformerLayer's, and Megatron's own
    bias-dropout-add runs (no extra work)."""
    plain = gpt(get_gpt_layer_local_spec(), torch.bfloat16, dropout=0.1).decoder.layers[1]
    raptr = gpt(get_gpt_raptr_layer_spec(), torch.bfloat16, dropout=0.1).decoder.layers[1]
    raptr.load_state_dict(plain.state_dict())
    x = torch.randn(SEQ, BATCH, HIDDEN, dtype=torch.bfloat16, requires_grad=True)
    outputs, grads = [], []
    for layer in (plain, raptr):
        reset_rng()
        output = layer(hidden_states=x, attention_mask=None)[0]
        outputs.append(output)
        grads.append(torch.autograd.grad(output.float().square().sum(), [x, *layer.parameters()]))
    assert torch.equal(*outputs)
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    assert raptr.mlp_bda(True, True) is get_bias_dropout_add(True, True)


def test_fp32_scaled_update_and_its_gradients_equal_the_output_difference_under_dropout():
    """y = x + s * (layer(x) - x) in one RNG state (the same dropout masks), with input and weight gradients."""
    layer = gpt(get_gpt_raptr_layer_spec(), dropout=0.2).decoder.layers[1]
    x = torch.randn(SEQ, BATCH, HIDDEN, requires_grad=True)
    weights = torch.randn(SEQ, BATCH, HIDDEN)
    results = []
    for output in (lambda: run(layer, x, 2.5), lambda: x + 2.5 * (run(layer, x, 1.0) - x)):
        y = output()
        results.append((y, torch.autograd.grad((y * weights).sum(), [x, *layer.parameters()])))
    (scaled, scaled_grads), (reference, reference_grads) = results
    torch.testing.assert_close(scaled, reference)
    for a, b in zip(scaled_grads, reference_grads):
        torch.testing.assert_close(a, b)
    # Dropout is on: another RNG state gives another output.
    layer.raptr_scale = 2.5
    torch.manual_seed(6)
    assert not torch.allclose(layer(hidden_states=x, attention_mask=None)[0], scaled)


@pytest.mark.parametrize("recompute", [dict(recompute_granularity="full", recompute_method="uniform",
                                            recompute_num_layers=1),
                                       dict(recompute_granularity="selective", recompute_modules=["core_attn"])])
def test_activation_recompute_reproduces_the_scaled_layers(recompute):
    """With dropout, a recomputed scaled forward gives the loss and gradients of a stored one."""
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    results = []
    for model in (gpt(get_gpt_raptr_layer_spec(), dropout=0.2),
                  gpt(get_gpt_raptr_layer_spec(), dropout=0.2, **recompute)):
        for layer, scale in zip(model.decoder.layers, (1.5, 3.0)):
            layer.raptr_scale = scale
        reset_rng()
        loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).mean()
        loss.backward()
        results.append((loss, [p.grad for p in model.parameters()]))
    (loss, grads), (recomputed_loss, recomputed_grads) = results
    assert torch.equal(loss, recomputed_loss)
    for a, b in zip(grads, recomputed_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_a_layer_without_an_mlp_refuses_a_scale():
    """The scale is applied in the MLP's bias-dropout-add: an attention-only layer would silently not scale."""
    spec = get_gpt_raptr_layer_spec()
    spec = dataclasses.replace(spec, submodules=dataclasses.replace(
        spec.submodules, pre_mlp_layernorm=IdentityOp, mlp=IdentityOp, mlp_bda=IdentityFuncOp))
    layer = gpt(spec).decoder.layers[1]
    with pytest.raises(ValueError, match=r"layer 2: RaPTr scale 2.0 .* \(mlp_bda\)"):
        run(layer, torch.randn(SEQ, BATCH, HIDDEN), 2.0)
