"""squash and capsule_length at the edges of floating point: finite values and gradients for
every finite input, the old formula's numbers for ordinary ones."""

import pytest
import torch

from CapsNet import EPS, capsule_length, squash

F32 = torch.finfo(torch.float32)
SUBNORMAL = F32.smallest_normal * F32.eps  # 2^-149, the smallest positive float32


def unscaled_squash(s: torch.Tensor) -> torch.Tensor:
    """The formula before scaling, which overflows once |s|^2 does."""
    norm_sq = (s * s).sum(dim=-1, keepdim=True)
    return s * (norm_sq / (1.0 + norm_sq) / torch.sqrt(norm_sq + EPS))


def unscaled_length(v: torch.Tensor) -> torch.Tensor:
    return torch.sqrt((v * v).sum(dim=-1) + EPS)


def extreme_vectors(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """16-D capsules at the ends of the dtype's range."""
    big, tiny = torch.finfo(dtype).max, torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    signs = torch.tensor([1.0, -1.0], dtype=dtype).repeat(8)
    return {
        "largest": torch.full((16,), big, dtype=dtype),
        "largest-mixed-signs": big * signs,
        "one-largest": torch.cat([torch.tensor([-big], dtype=dtype), torch.zeros(15, dtype=dtype)]),
        "subnormal": tiny * signs,
        "zeros": torch.zeros(16, dtype=dtype),
        "all-scales": torch.tensor(
            [big, -big, tiny, -tiny, 0.0, 1.0, -1e-30, 3e20] * 2, dtype=dtype
        ),
    }


def value_and_gradient(function, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_()
    y = function(x)
    (gradient,) = torch.autograd.grad(y, x, torch.ones_like(y))
    return y.detach(), gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("function", [squash, capsule_length])
def test_finite_values_and_gradients_at_the_extremes(function, dtype):
    for name, vector in extreme_vectors(dtype).items():
        value, gradient = value_and_gradient(function, vector)
        assert torch.isfinite(value).all() and torch.isfinite(gradient).all(), name


def test_squash_of_the_largest_floats_is_a_unit_vector_along_them():
    for name, s in extreme_vectors(torch.float32).items():
        if s.abs().max() == F32.max:
            v = squash(s)
            expected = s.double() / s.double().norm()  # |s| >> 1: |v| = 1
            torch.testing.assert_close(v.double(), expected, rtol=1e-6, atol=1e-7, msg=name)


def test_capsule_length_is_exact_up_to_the_largest_float_and_saturates_beyond():
    one_largest = extreme_vectors(torch.float32)["one-largest"]
    value, gradient = value_and_gradient(capsule_length, one_largest)
    assert value == F32.max and gradient[0] == -1 and (gradient[1:] == 0).all()
    assert capsule_length(torch.full((16,), F32.max)) == F32.max  # 4 x the largest float


def test_tiny_and_zero_inputs_keep_eps_inside_the_root():
    for s in (torch.zeros(3, 16), torch.full((3, 16), SUBNORMAL)):
        v, grad_v = value_and_gradient(squash, s)
        length, grad_length = value_and_gradient(capsule_length, s)
        assert (v == 0).all() and (grad_v == 0).all()
        assert (
            torch.equal(length, torch.full((3,), EPS).sqrt()) and (grad_length.abs() < 1e-30).all()
        )


@pytest.mark.parametrize(
    "function, unscaled", [(squash, unscaled_squash), (capsule_length, unscaled_length)]
)
def test_float64_reference_over_the_whole_float32_range(function, unscaled):
    """Random directions from 1e-45 to 3e38 long: values and gradients agree with the formula
    in float64, where |s|^2 cannot overflow."""
    torch.manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(84, 16, dtype=torch.float64), dim=-1)
    s = (directions * torch.logspace(-45, 38.5, 84, dtype=torch.float64)[:, None]).float()
    value, gradient = value_and_gradient(function, s)
    expected_value, expected_gradient = value_and_gradient(unscaled, s.double())
    torch.testing.assert_close(value.double(), expected_value, rtol=1e-6, atol=1e-7)
    # float32 cannot hold gradients below its smallest normal number, 1.2e-38
    torch.testing.assert_close(gradient.double(), expected_gradient, rtol=1e-5, atol=1e-37)


@pytest.mark.parametrize(
    "function, unscaled", [(squash, unscaled_squash), (capsule_length, unscaled_length)]
)
def test_ordinary_inputs_give_the_unscaled_formula(function, unscaled):
    """Capsules as routing and the primary capsules make them, from 1e-4 to 1e4 long."""
    torch.manual_seed(0)
    s = torch.randn(200, 16) * torch.logspace(-4, 3, 200)[:, None]
    value, gradient = value_and_gradient(function, s)
    expected_value, expected_gradient = value_and_gradient(unscaled, s)
    torch.testing.assert_close(value, expected_value, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gradient, expected_gradient, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "function, unscaled", [(squash, unscaled_squash), (capsule_length, unscaled_length)]
)
def test_components_up_to_one_are_not_scaled_at_all(function, unscaled):
    torch.manual_seed(0)
    s = (torch.randn(500, 16) * torch.logspace(-6, 0, 500)[:, None]).clamp(-1, 1)
    assert torch.equal(function(s), unscaled(s))


@pytest.mark.parametrize("function", [squash, capsule_length])
def test_gradcheck_across_scales(function):
    """The scaled branch (largest component above 1) has the true gradient too."""
    torch.manual_seed(0)
    scales = torch.tensor([1e-3, 0.5, 30.0, 1e3], dtype=torch.float64)[:, None]
    s = (torch.randn(4, 6, dtype=torch.float64) * scales).requires_grad_()
    assert torch.autograd.gradcheck(function, (s,))


def test_any_dimension_can_hold_the_capsule():
    s = torch.randn(16, 5) * torch.tensor([1e-2, 1.0, 1e2, 1e20, 1e37])
    torch.testing.assert_close(squash(s, dim=0), squash(s.T).T)
    torch.testing.assert_close(capsule_length(s, dim=0), capsule_length(s.T))
