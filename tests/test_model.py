"""The model against the paper: squash, PrimaryCaps layout, routing, decoder masking, loss."""

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from capslab.baseline import BaselineConfig, PaperCNNConfig
from capslab.settings import settings_from_dict, settings_to_dict
from capslab.training import TrainConfig
from CapsNet import (
    CPU_ROUTING_PIECE,
    CapsNet,
    CapsNetConfig,
    ChannelsLastGradConv2d,
    ChannelsLastGradients,
    ConvLayer,
    DigitCaps,
    DynamicRouting,
    PrimaryCaps,
    PrimaryConv2d,
    PrimaryConvGradients,
    capsule_loss,
    margin_loss,
    reconstruction_loss,
    squash,
)

from conftest import SMALL


def reference_routing(u_hat: torch.Tensor, iterations: int, detach_early: bool = False):
    """Procedure 1 written as plainly as the paper, one loop per index, for parity checks.

    u_hat (B, J, I, D) -> v (B, J, D), c (B, J, I). Autograd differentiates it.
    """
    batch, num_out, num_in, _ = u_hat.shape
    v_all, c_all = [], []
    for b in range(batch):  # b_ij belongs to one example
        logits = [
            [torch.zeros((), dtype=u_hat.dtype) for _ in range(num_out)] for _ in range(num_in)
        ]
        for r in range(iterations):
            votes = u_hat[b] if r == iterations - 1 or not detach_early else u_hat[b].detach()
            c = [torch.softmax(torch.stack(logits[i]), dim=0) for i in range(num_in)]  # over j
            s = [sum(c[i][j] * votes[j, i] for i in range(num_in)) for j in range(num_out)]
            v = [squash(s_j) for s_j in s]
            if r < iterations - 1:
                for i in range(num_in):
                    for j in range(num_out):
                        logits[i][j] = logits[i][j] + torch.dot(votes[j, i], v[j])
        v_all.append(torch.stack(v))
        c_all.append(torch.stack(c, dim=1))
    return torch.stack(v_all), torch.stack(c_all)


# --- squash and lengths --------------------------------------------------------------


def test_squash_keeps_direction_and_length_below_one():
    s = torch.randn(100, 16) * torch.logspace(-3, 3, 100).unsqueeze(1)
    v = squash(s)
    lengths = v.norm(dim=-1)
    assert (lengths <= 1).all()
    assert (lengths[s.norm(dim=-1) < 100] < 1).all()  # float32 rounds 1 - 1e-6 up to 1
    cosine = F.cosine_similarity(v, s, dim=-1)
    assert torch.allclose(cosine, torch.ones(100), atol=1e-5)
    # Eq. 1: |v| = |s|^2 / (1 + |s|^2)
    norm = s.norm(dim=-1)
    assert torch.allclose(lengths, norm**2 / (1 + norm**2), rtol=1e-4)


# --- shapes and layout ---------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("iterations", [1, 3])
def test_output_shapes(batch, iterations):
    model = CapsNet(SMALL, routing_iterations=iterations)
    lengths, reconstructions, v = model(torch.rand(batch, 1, 28, 28))
    assert lengths.shape == (batch, 10)
    assert reconstructions.shape == (batch, 1, 28, 28)
    assert v.shape == (batch, 10, 16)
    assert ((reconstructions >= 0) & (reconstructions <= 1)).all()


def test_paper_configuration_has_1152_primary_capsules():
    config = CapsNetConfig()
    assert config.num_primary_caps == 1152
    model = CapsNet(config)
    u = model.primary_caps(model.conv1(torch.rand(2, 1, 28, 28)))
    assert u.shape == (2, 1152, 8)


def test_config_follows_input_size_and_classes():
    model = CapsNet(image_size=32, num_classes=5, conv1_channels=16, primary_channels=4)
    assert model.config.num_primary_caps == 4 * 8 * 8
    lengths, reconstructions, _ = model(torch.rand(2, 1, 32, 32))
    assert lengths.shape == (2, 5) and reconstructions.shape == (2, 1, 32, 32)


def test_primary_capsule_is_eight_channels_at_one_position():
    layer = PrimaryCaps(SMALL)
    x = torch.randn(2, SMALL.conv1_channels, 20, 20)
    conv_out = layer.conv(x)  # (2, 8*8, 6, 6)
    capsules = layer(x)  # (2, 8*36, 8)
    channel, row, col = 3, 4, 1
    expected = squash(conv_out[:, channel * 8 : (channel + 1) * 8, row, col])  # (2, 8)
    index = channel * 36 + row * 6 + col
    assert torch.allclose(capsules[:, index], expected, atol=1e-6)


def test_conv1_channels_last_gradients_match_autograd_and_pass_gradcheck():
    torch.manual_seed(0)
    x = torch.rand(3, 1, 14, 14, requires_grad=True)
    weight = torch.randn(6, 1, 9, 9, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    grad_out = torch.randn(3, 6, 6, 6)
    out = ChannelsLastGradients.apply(x, weight, bias)
    assert torch.equal(out, F.conv2d(x, weight, bias))
    ours = torch.autograd.grad(out, (x, weight, bias), grad_out)
    plain = torch.autograd.grad(F.conv2d(x, weight, bias), (x, weight, bias), grad_out)
    for mine, reference in zip(ours, plain):
        torch.testing.assert_close(mine, reference)
    without_bias = ChannelsLastGradients.apply(x, weight, None).sum()
    (expected,) = torch.autograd.grad(F.conv2d(x, weight).sum(), weight)
    torch.testing.assert_close(torch.autograd.grad(without_bias, weight)[0], expected)
    tiny = (torch.rand(2, 1, 5, 5), torch.randn(3, 1, 3, 3), torch.randn(3))
    assert torch.autograd.gradcheck(
        ChannelsLastGradients.apply, [t.double().requires_grad_() for t in tiny]
    )


def test_conv1_takes_channels_last_gradients_for_one_channel_in_float32_on_the_cpu_only():
    layer = ConvLayer(SMALL)
    x = torch.rand(2, 1, 28, 28)

    def conv_backward(out):  # relu's input's grad_fn: the convolution's
        return out.grad_fn.next_functions[0][0].name()

    assert conv_backward(layer(x)) == "ChannelsLastGradientsBackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv_backward(layer(x)) == "ConvolutionBackward0"
    assert conv_backward(layer.double()(x.double())) == "ConvolutionBackward0"
    colour = ConvLayer(replace(SMALL, in_channels=3))
    assert conv_backward(colour(torch.rand(2, 3, 28, 28))) == "ConvolutionBackward0"
    strided = ChannelsLastGradConv2d(1, 4, 3, stride=2)  # not what it is written for
    assert strided(x).grad_fn.name() == "ConvolutionBackward0"


@pytest.mark.parametrize(
    "side, stride",
    [(20, (2, 2)), (21, (2, 2)), (12, (1, 1)), (16, (3, 2))],  # 20: the last row goes unread
)
def test_primary_conv_gradients_match_autograd(side, stride):
    torch.manual_seed(side)
    x = torch.randn(3, 5, side, side, requires_grad=True)
    weight = torch.randn(4, 5, 9, 9, requires_grad=True)
    bias = torch.randn(4, requires_grad=True)
    out = PrimaryConvGradients.apply(x, weight, bias, stride)
    assert torch.equal(out, F.conv2d(x, weight, bias, stride))
    grad_out = torch.randn_like(out)
    ours = torch.autograd.grad(out, (x, weight, bias), grad_out)
    plain = torch.autograd.grad(F.conv2d(x, weight, bias, stride), (x, weight, bias), grad_out)
    for mine, reference in zip(ours, plain):
        torch.testing.assert_close(mine, reference)
    frozen_input = PrimaryConvGradients.apply(x.detach(), weight, None, stride)
    (grad_weight,) = torch.autograd.grad(frozen_input, weight, grad_out)
    torch.testing.assert_close(grad_weight, plain[1])


@pytest.mark.parametrize("stride", [(2, 2), (1, 1), (3, 2)])
def test_primary_conv_gradients_pass_gradcheck(stride):
    torch.manual_seed(0)
    tiny = (torch.randn(2, 3, 8, 7), torch.randn(4, 3, 3, 3), torch.randn(4))
    assert torch.autograd.gradcheck(
        lambda x, w, b: PrimaryConvGradients.apply(x, w, b, stride),
        [t.double().requires_grad_() for t in tiny],
    )


def test_primary_conv_takes_its_own_gradients_in_float32_and_bf16_autocast_on_the_cpu_only():
    layer = PrimaryCaps(SMALL)
    x = torch.randn(2, SMALL.conv1_channels, 20, 20)
    assert layer.conv(x).grad_fn.name() == "PrimaryConvGradientsBackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.conv(x).grad_fn.name() == "PrimaryConvGradientsBackward"
    with torch.autocast("cpu", dtype=torch.float16):
        assert layer.conv(x).grad_fn.name() == "ConvolutionBackward0"
    layer.double()
    assert layer.conv(x.double()).grad_fn.name() == "ConvolutionBackward0"
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast leaves float64 as it is
        out = layer.conv(x.double())
    assert out.dtype == torch.float64 and out.grad_fn.name() == "ConvolutionBackward0"
    padded = PrimaryConv2d(4, 4, 3, stride=2, padding=1)  # not what it is written for
    assert padded(torch.randn(1, 4, 9, 9)).grad_fn.name() == "ConvolutionBackward0"


def test_primary_conv_under_bf16_autocast_matches_autograd_to_bf16_rounding():
    torch.manual_seed(0)
    ours = PrimaryConv2d(6, 5, 9, stride=2)
    plain = nn.Conv2d(6, 5, 9, stride=2)
    plain.load_state_dict(ours.state_dict())
    x = torch.rand(3, 6, 20, 20)
    results = []
    for conv in (ours, plain):
        x_in = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x_in)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad(out, (x_in, conv.weight, conv.bias), grad_out.bfloat16())
        results.append((out, *grads))
    (out, grad_x, grad_w, grad_b), (plain_out, plain_x, plain_w, plain_b) = results
    assert out.dtype == torch.bfloat16 and torch.equal(out, plain_out)
    assert grad_w.dtype == grad_b.dtype == torch.float32  # the parameters' own, as autocast's
    assert torch.equal(grad_x, plain_x) and torch.equal(grad_b, plain_b)  # autograd's own
    # The weight gradient, a bf16 convolution of its own, within bf16 rounding of autograd's.
    torch.testing.assert_close(grad_w, plain_w, rtol=2**-7, atol=2**-8 * plain_w.abs().max())


# --- routing -------------------------------------------------------------------------


# With one iteration there is nothing early to detach, so detach_early is tried from 2 on.
@pytest.mark.parametrize(
    "iterations, detach_early",
    [(1, False), (2, False), (3, False), (5, False), (2, True), (3, True), (5, True)],
)
def test_routing_matches_plain_procedure_1(iterations, detach_early):
    torch.manual_seed(iterations)
    u_hat = (0.5 * torch.randn(2, 3, 5, 4, dtype=torch.float64)).requires_grad_()
    grad_v = torch.randn(2, 3, 4, dtype=torch.float64)
    v, c = DynamicRouting.apply(u_hat, iterations, detach_early)
    v_ref, c_ref = reference_routing(u_hat, iterations, detach_early)
    assert torch.allclose(v, v_ref, atol=1e-12) and torch.allclose(c, c_ref, atol=1e-12)
    (grad,) = torch.autograd.grad(v, u_hat, grad_v)
    (grad_ref,) = torch.autograd.grad(v_ref, u_hat, grad_v)
    assert torch.allclose(grad, grad_ref, atol=1e-12)


@pytest.mark.parametrize("iterations", [1, 3])
def test_routing_passes_gradcheck(iterations):
    u_hat = (0.5 * torch.randn(2, 3, 4, 3, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: DynamicRouting.apply(x, iterations, False)[0], (u_hat,)
    )


def test_digit_caps_matches_reference_in_the_full_model():
    torch.manual_seed(0)
    layer = DigitCaps(CapsNetConfig(primary_channels=2, routing_iterations=3)).double()
    u = torch.randn(2, layer.W.shape[0], 8, dtype=torch.float64)
    v, _ = layer(u)
    assert layer.votes(u).dtype == v.dtype == torch.float64  # routing keeps float64 capsules
    v_ref, _ = reference_routing(layer.votes(u), 3)
    assert torch.allclose(v, v_ref, atol=1e-10)


def test_routing_in_cpu_pieces_matches_one_pass():
    # On a CPU, DigitCaps routes CPU_ROUTING_PIECE images at a time: no value or gradient changes.
    torch.manual_seed(0)
    layer = DigitCaps(CapsNetConfig(primary_channels=2)).double()
    u = torch.randn(
        2 * CPU_ROUTING_PIECE + 3, layer.W.shape[0], 8, dtype=torch.float64, requires_grad=True
    )
    v, c = layer(u)
    v_ref, c_ref = DynamicRouting.apply(layer.votes(u), 3, False)
    assert torch.allclose(v, v_ref, atol=1e-12) and torch.allclose(c, c_ref, atol=1e-12)
    weights = torch.randn_like(v)
    grads = torch.autograd.grad((v * weights).sum(), (u, layer.W))
    grads_ref = torch.autograd.grad((v_ref * weights).sum(), (u, layer.W))
    for grad, grad_ref in zip(grads, grads_ref):
        assert torch.allclose(grad, grad_ref, atol=1e-10)


def test_coupling_sums_to_one_over_outputs():
    u_hat = torch.randn(4, 10, 50, 16)
    _, c = DynamicRouting.apply(u_hat, 3, False)
    assert torch.allclose(c.sum(dim=1), torch.ones(4, 50), atol=1e-6)


def test_agreeing_input_gains_coupling():
    torch.manual_seed(0)
    u_hat = 0.1 * torch.randn(1, 3, 20, 8)
    direction = torch.randn(8)
    u_hat[0, 1, :15] = direction  # 15 inputs agree on output 1; input 0 is one of them
    _, c = DynamicRouting.apply(u_hat, 3, False)
    assert c[0, 1, 0] > 1 / 3 + 0.1  # more than the uniform start
    assert c[0, 1, 0] == c[0, :, 0].max()


def test_batch_independence(small_model):
    x = torch.rand(4, 1, 28, 28)
    lengths, reconstructions, v = small_model(x)
    perturbed = x.clone()
    perturbed[2] = torch.rand(1, 28, 28)
    lengths2, reconstructions2, v2 = small_model(perturbed)
    keep = [0, 1, 3]
    assert torch.allclose(v[keep], v2[keep], atol=1e-6)
    assert torch.allclose(reconstructions[keep], reconstructions2[keep], atol=1e-6)
    assert not torch.allclose(v[2], v2[2])


def test_routing_is_stateless_between_calls(small_model):
    x = torch.rand(2, 1, 28, 28)
    first = small_model(x)[2]
    small_model(torch.rand(8, 1, 28, 28))
    assert torch.equal(first, small_model(x)[2])


# --- decoder masking -----------------------------------------------------------------


def test_decoder_uses_the_true_label_in_training_and_the_prediction_at_test(small_model):
    x = torch.rand(3, 1, 28, 28)
    lengths, recon_predicted, v = small_model(x)
    predicted = lengths.argmax(dim=1)
    other = (predicted + 1) % 10
    _, recon_other, _ = small_model(x, other)
    assert torch.allclose(recon_predicted, small_model.decoder(v, predicted))
    assert torch.allclose(recon_other, small_model.decoder(v, other))
    assert not torch.equal(recon_other, recon_predicted)


def test_decoder_sees_only_the_masked_capsule(small_model):
    v = torch.randn(2, 10, 16)
    target = torch.tensor([3, 7])
    changed = v.clone()
    changed[:, 0] += 5.0  # capsule 0 is masked out for both examples
    assert torch.equal(small_model.decoder(v, target), small_model.decoder(changed, target))


# --- loss ----------------------------------------------------------------------------


def test_margin_loss_hand_computed():
    lengths = torch.tensor([[0.5, 0.3, 0.05], [0.95, 0.0, 0.1]])
    target = torch.tensor([0, 0])
    # example 0: (0.9 - 0.5)^2 + 0.5 * (0.3 - 0.1)^2 + 0 ; example 1: everything within margins
    expected = torch.tensor([0.16 + 0.5 * 0.04, 0.0])
    assert torch.allclose(margin_loss(lengths, target), expected)


def test_reconstruction_term_is_0_0005_times_summed_squared_error():
    images = torch.zeros(2, 1, 28, 28)
    reconstructions = torch.full((2, 1, 28, 28), 0.5)
    assert torch.allclose(
        reconstruction_loss(reconstructions, images), torch.full((2,), 784 * 0.25)
    )
    lengths = torch.tensor([[0.9, 0.1], [0.1, 0.9]])  # margin loss exactly 0
    loss = capsule_loss(lengths, reconstructions, images, torch.tensor([0, 1]))
    assert torch.isclose(loss, torch.tensor(0.0005 * 784 * 0.25))


def test_without_reconstruction_the_loss_is_the_margin_loss_and_the_decoder_is_skipped(
    small_model,
):
    x, target = torch.rand(3, 1, 28, 28), torch.tensor([0, 4, 9])
    lengths, reconstructions, v = small_model(x, target)
    skipped = small_model(x, target, reconstruct=False)
    assert skipped[1] is None
    assert torch.equal(skipped[0], lengths) and torch.equal(skipped[2], v)
    margin = margin_loss(lengths, target).mean()
    assert torch.equal(capsule_loss(lengths, None, x, target, reconstruction_weight=0), margin)
    assert capsule_loss(lengths, reconstructions, x, target) > margin
    with pytest.raises(ValueError, match="reconstruction_weight"):  # no silent margin-only loss
        capsule_loss(lengths, None, x, target)


def test_initial_loss_is_what_theory_says(mnist_test):
    torch.manual_seed(0)
    model = CapsNet()
    x = mnist_test.images[:32].unsqueeze(1).float() / 255
    y = mnist_test.labels[:32]
    lengths, reconstructions, _ = model(x, y)
    # With W ~ N(0, 0.01^2) all lengths start near 0: margin loss ~ 0.9^2, and a decoder
    # that outputs ~0.5 everywhere costs 0.0005 * sum (x - 0.5)^2.
    assert lengths.max() < 0.1
    expected_margin = ((0.9 - lengths.gather(1, y[:, None])) ** 2).mean()
    assert torch.isclose(margin_loss(lengths, y).mean(), expected_margin, atol=1e-3)
    assert 0.78 < expected_margin < 0.82
    expected_reconstruction = 0.0005 * ((x - 0.5) ** 2).flatten(1).sum(1).mean()
    loss = capsule_loss(lengths, reconstructions, x, y)
    assert torch.isclose(loss, expected_margin + expected_reconstruction, rtol=0.05)


# --- learning ------------------------------------------------------------------------


def test_gradients_reach_every_parameter(small_model):
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    lengths, reconstructions, _ = small_model(x, y)
    capsule_loss(lengths, reconstructions, x, y).backward()
    for name, parameter in small_model.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


def test_overfits_a_small_batch(mnist_train):
    torch.manual_seed(0)
    model = CapsNet(SMALL)
    x = mnist_train.images[:32].unsqueeze(1).float() / 255
    y = mnist_train.labels[:32]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        lengths, reconstructions, _ = model(x, y)
        loss = capsule_loss(lengths, reconstructions, x, y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    lengths, _, _ = model(x)
    assert (lengths.argmax(dim=1) == y).all()
    assert losses[-1] < 0.1 * losses[0]


@pytest.mark.parametrize(
    "field, value",
    [
        ("routing_iterations", 0),
        ("routing_iterations", "3"),
        ("routing_iterations", 2.5),
        ("digit_dim", -1),
        ("decoder_hidden", (512,)),
        ("decoder_hidden", 512),
        ("decoder_hidden", (0, 5)),
        ("weight_std", 0),
        ("weight_std", -1.0),
        ("weight_std", True),
        ("weight_std", "0.01"),
        ("in_channels", 0),
        ("num_classes", 0),
        ("conv1_channels", 1.5),
        ("conv1_channels", 2**31),  # torch's kernels would overflow, not refuse
        ("kernel_size", 0),
        ("primary_channels", None),
        ("primary_dim", True),
        ("detach_early_routing", 1),
        ("image_size", 12),
    ],
)
def test_config_refuses_what_the_model_cannot_be_built_from(field, value):
    with pytest.raises(ValueError, match=field):
        CapsNetConfig(**{field: value})
    with pytest.raises(ValueError):
        CapsNet(**{field: value})


def test_scoring_with_another_r_leaves_the_module_alone(small_model):
    x = torch.rand(2, 1, 28, 28)
    small_model.eval()
    with torch.no_grad():
        at_one = small_model(x, routing_iterations=1)[0]
        default = small_model(x)[0]
        expected_one = CapsNet(SMALL, routing_iterations=1).eval()
        expected_one.load_state_dict(small_model.state_dict())
        torch.testing.assert_close(at_one, expected_one(x)[0])
    assert small_model.digit_caps.iterations == 3 and small_model.config.routing_iterations == 3
    assert not torch.equal(at_one, default)
    with pytest.raises(ValueError, match="iterations"):
        small_model(x, routing_iterations=0)


@pytest.mark.parametrize(
    "config",
    [CapsNetConfig(decoder_hidden=(16, 32)), BaselineConfig(), PaperCNNConfig(), TrainConfig()],
    ids=lambda config: type(config).__name__,
)
def test_every_config_round_trips_through_json_with_its_tuples(config):
    """What a checkpoint saves: plain JSON (tuples as lists), and the same config back."""
    saved = json.loads(json.dumps(settings_to_dict(config)))
    assert settings_from_dict(type(config), saved) == config
    assert not any(isinstance(value, tuple) for value in settings_to_dict(config).values())


@pytest.mark.parametrize(
    ("field", "value"),
    [("epochs", True), ("batch_size", 0), ("seed", -1), ("val_size", False), ("max_shift", 9)],
)
def test_training_settings_refuse_what_is_not_a_whole_number_in_range(field, value):
    """True counts as the int 1 in Python: as an epoch count it would be a silent mistake."""
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})
