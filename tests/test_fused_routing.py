"""The compiled CPU routing kernel (capslab/routing.cpp) against the torch code and the paper."""

import os
import shutil
import warnings

import pytest
import torch

from capslab import fused_routing
from capslab.fused_routing import FusedRouting
from CapsNet import EPS, CapsNet, CapsNetConfig, DigitCaps, DynamicRouting

from test_model import reference_routing

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX") or "c++") is None, reason="no C++ compiler here"
)


def kernel(votes, iterations=3, detach_early=False):
    """votes (I, B, J*16) -> v (B, J, 16), c (B, J, I) through the kernel."""
    num_out = votes.shape[2] // 16
    return FusedRouting.apply(votes, iterations, detach_early, num_out, EPS)


def torch_layout(votes: torch.Tensor) -> torch.Tensor:
    """(I, B, J*16) -> (B, J, I, 16), the torch code's layout, in float32 or float64."""
    num_in, batch, width = votes.shape
    u_hat = votes.view(num_in, batch, width // 16, 16).permute(1, 2, 0, 3)
    return u_hat.to(torch.promote_types(votes.dtype, torch.float32))


def random_votes(num_in, batch, num_out, dtype=torch.float64, scale=0.5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    votes = scale * torch.randn(num_in, batch, num_out * 16, generator=generator, dtype=dtype)
    return votes.requires_grad_()


@pytest.mark.parametrize("iterations", [1, 2, 3, 5])
@pytest.mark.parametrize("detach_early", [False, True])
@pytest.mark.parametrize("num_in, num_out", [(5, 3), (37, 10), (16, 16), (37, 16), (32, 1)])
def test_kernel_matches_the_torch_routing_in_float64(iterations, detach_early, num_in, num_out):
    # 37 inputs leave a partial block of 16, 32 fill two; 16 outputs fill every lane.
    votes = random_votes(num_in, 3, num_out, seed=iterations)
    v, c = kernel(votes, iterations, detach_early)
    v_ref, c_ref = DynamicRouting.apply(torch_layout(votes), iterations, detach_early)
    torch.testing.assert_close(v, v_ref, rtol=0, atol=1e-13)
    torch.testing.assert_close(c, c_ref, rtol=0, atol=1e-13)
    grad_v = torch.randn_like(v)
    (grad,) = torch.autograd.grad(v, votes, grad_v)
    (grad_ref,) = torch.autograd.grad(v_ref, votes, grad_v)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-13)


def test_kernel_matches_procedure_1_written_plainly():
    votes = random_votes(6, 2, 3)
    v, c = kernel(votes)
    v_ref, c_ref = reference_routing(torch_layout(votes), 3)
    torch.testing.assert_close(v, v_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(c, c_ref, rtol=0, atol=1e-12)


def test_kernel_passes_gradcheck():
    votes = random_votes(5, 2, 3)
    assert torch.autograd.gradcheck(lambda x: kernel(x)[0], (votes,))


def test_float32_kernel_agrees_with_the_torch_routing():
    votes = random_votes(1152, 4, 10, dtype=torch.float32, scale=0.05)
    v, c = kernel(votes)
    v_ref, c_ref = DynamicRouting.apply(torch_layout(votes), 3, False)
    assert v.dtype == c.dtype == torch.float32
    torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c, c_ref, rtol=1e-5, atol=1e-7)
    assert torch.allclose(c.sum(dim=1), torch.ones(4, 1152))


def test_bf16_votes_route_in_float32_and_get_bf16_gradients():
    votes = random_votes(1152, 2, 10, dtype=torch.float32, scale=0.05).detach().bfloat16()
    votes.requires_grad_()
    v, c = kernel(votes)
    exact = votes.detach().float().requires_grad_()  # the same values, widened
    v_ref, c_ref = DynamicRouting.apply(torch_layout(exact), 3, False)
    assert v.dtype == torch.float32
    torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-6)
    grad_v = torch.randn_like(v)
    (grad,) = torch.autograd.grad(v, votes, grad_v)
    (grad_ref,) = torch.autograd.grad(v_ref, exact, grad_v)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.float(), grad_ref, rtol=0.01, atol=1e-3)


def test_kernel_refuses_what_it_cannot_route():
    with pytest.raises(ValueError, match="r >= 1"):
        FusedRouting.apply(random_votes(5, 2, 3), 0, False, 3, EPS)
    with pytest.raises(ValueError, match="1 to 16 outputs"):
        FusedRouting.apply(random_votes(5, 2, 17), 3, False, 17, EPS)


def test_kernel_stays_finite_when_votes_are_huge():
    votes = random_votes(40, 2, 10, dtype=torch.float32, scale=1e6)
    v, c = kernel(votes)
    v.sum().backward()
    assert torch.isfinite(v).all() and torch.isfinite(c).all()
    assert torch.isfinite(votes.grad).all()


def test_threads_split_the_batch_without_changing_a_bit():
    votes = random_votes(100, 7, 10, dtype=torch.float32)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            v, c = kernel(votes)
            (grad,) = torch.autograd.grad(v.square().sum(), votes)
            results.append((v, c, grad))
    finally:
        torch.set_num_threads(threads)
    for one, other in zip(*results):
        assert torch.equal(one, other)


def test_digit_caps_on_the_kernel_matches_the_torch_code():
    torch.manual_seed(0)
    layer = DigitCaps(CapsNetConfig())
    u = (0.1 * torch.randn(5, 1152, 8)).requires_grad_()
    assert fused_routing.usable(layer.raw_votes(u), 10, 16)
    outputs = []
    for enabled in (True, False):
        with fused_routing.kernel_enabled(enabled):
            v, c = layer(u)
        grads = torch.autograd.grad(v.square().sum(), (u, layer.W))
        outputs.append((v, c, *grads))
    assert fused_routing.is_enabled()
    for ours, theirs in zip(*outputs):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_digit_caps_under_bf16_autocast_matches_the_torch_code():
    torch.manual_seed(0)
    layer = DigitCaps(CapsNetConfig())
    u = 0.1 * torch.randn(3, 1152, 8)
    outputs = []
    for enabled in (True, False):
        with fused_routing.kernel_enabled(enabled), torch.autocast("cpu", dtype=torch.bfloat16):
            outputs.append(layer(u))
    (v, c), (v_ref, c_ref) = outputs
    assert v.dtype == torch.float32
    torch.testing.assert_close(v, v_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(c, c_ref, rtol=1e-4, atol=1e-7)


def test_other_capsule_widths_route_with_the_torch_code():
    model = CapsNet(CapsNetConfig(digit_dim=8, conv1_channels=16, primary_channels=4))
    u = torch.randn(2, model.config.num_primary_caps, 8)
    assert not fused_routing.usable(model.digit_caps.raw_votes(u), 10, 8)
    lengths, reconstructions, v = model(torch.rand(2, 1, 28, 28))
    assert v.shape == (2, 10, 8) and torch.isfinite(lengths).all()


def test_the_build_lands_whole_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSNET_CACHE", str(tmp_path))
    fused_routing.library.cache_clear()
    try:
        assert fused_routing.library() is not None
        (built,) = tmp_path.glob("routing-*.so")
        assert built.stat().st_size > 0
        assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # no build folder left
    finally:
        fused_routing.library.cache_clear()


def test_without_a_compiler_routing_warns_once_and_uses_the_torch_code(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSNET_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    fused_routing.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="without its compiled CPU kernel"):
            assert fused_routing.library() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a second call stays quiet
            model = CapsNet(CapsNetConfig(conv1_channels=16, primary_channels=4))
            lengths, _, _ = model(torch.rand(2, 1, 28, 28))
        assert torch.isfinite(lengths).all()
    finally:
        fused_routing.library.cache_clear()


def test_the_cache_key_follows_the_cpu_but_not_its_clock(tmp_path):
    def identity(mhz, flags):
        cpuinfo = tmp_path / f"cpuinfo-{mhz}-{flags}"
        cpuinfo.write_text(
            f"processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel\t\t: 17\ncpu MHz\t\t: {mhz}\n"
            f"flags\t\t: {flags}\nbogomips\t: {mhz * 2}\n\nprocessor\t: 1\n"
        )
        return fused_routing.cpu_identity(cpuinfo)

    assert identity(2596.1, "avx2 avx512f") == identity(3700.0, "avx2 avx512f")
    assert identity(2596.1, "avx2 avx512f") != identity(2596.1, "avx2")
    assert fused_routing.build_key("c++", identity(1, "avx2")) != fused_routing.build_key(
        "c++", identity(1, "avx2 avx512f")
    )


def test_a_compiler_that_fails_leaves_routing_to_the_torch_code(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSNET_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # exists, and fails
    fused_routing.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="false failed"):
            assert fused_routing.library() is None
    finally:
        fused_routing.library.cache_clear()


def test_a_damaged_cached_build_is_built_again(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSNET_CACHE", str(tmp_path))
    fused_routing.library.cache_clear()
    try:
        built = fused_routing.build(os.environ.get("CXX") or "c++")
        built.write_bytes(b"not a shared library")
        assert fused_routing.library() is not None
        assert built.read_bytes()[:4] == b"\x7fELF"
    finally:
        fused_routing.library.cache_clear()
