"""The compiled CPU votes-and-routing kernel (capslab/routing.cpp) against the torch code and
the paper."""

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from capslab import fused_routing
from capslab.fused_routing import FusedRouting
from capslab.hardware import cpu_fields
from CapsNet import EPS, CapsNet, CapsNetConfig, DigitCaps, DynamicRouting, PrimaryCaps, squash

from conftest import REPO, assert_one_line_error, run_in_process
from test_model import reference_routing

pytestmark = pytest.mark.skipif(
    shutil.which(fused_routing.compiler_name()) is None, reason="no C++ compiler here"
)


def kernel(u, W, iterations=3, detach_early=False):
    """u (B, I, K), W (I, K, J*16) -> v (B, J, 16), c (B, J, I) through the kernel."""
    return FusedRouting.apply(u, W, iterations, detach_early, EPS)


def reference(u, W, iterations=3, detach_early=False, routing=DynamicRouting.apply):
    """The torch code: votes by matmul, in the (B, J, I, 16) layout, then `routing`."""
    votes = torch.bmm(u.transpose(0, 1), W)  # (I, B, J*16)
    num_in, batch, width = votes.shape
    u_hat = votes.view(num_in, batch, width // 16, 16).permute(1, 2, 0, 3)
    u_hat = u_hat.to(torch.promote_types(votes.dtype, torch.float32))
    return routing(u_hat, iterations, detach_early)


def random_inputs(num_in, batch, num_out, in_dim=8, dtype=torch.float64, scale=0.5, seed=0):
    """u (B, I, K) and W (I, K, J*16) whose votes have about `scale` spread, needing grad."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, num_in, in_dim, generator=generator, dtype=dtype)
    W = scale / in_dim**0.5 * torch.randn(num_in, in_dim, num_out * 16, generator=generator)
    return u.requires_grad_(), W.to(dtype).requires_grad_()


def assert_same_routing(ours, theirs, atol, rtol=0.0):
    """v, c and the gradients of a random function of v for u and W, kernel against reference."""
    (u, W), (v, c), (v_ref, c_ref) = ours[0], ours[1], theirs
    torch.testing.assert_close(v, v_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(c, c_ref, rtol=rtol, atol=atol)
    grad_v = torch.randn_like(v)
    grads = torch.autograd.grad(v, (u, W), grad_v)
    grads_ref = torch.autograd.grad(v_ref, (u, W), grad_v)
    for grad, grad_ref in zip(grads, grads_ref):
        assert grad.dtype == grad_ref.dtype
        torch.testing.assert_close(grad, grad_ref, rtol=rtol, atol=atol)


# With one iteration there is nothing early to detach, so detach_early is tried from 2 on.
@pytest.mark.parametrize(
    "iterations, detach_early",
    [(1, False), (2, False), (3, False), (5, False), (2, True), (3, True), (5, True)],
)
@pytest.mark.parametrize("num_in, num_out", [(5, 3), (37, 10), (16, 16), (37, 16), (32, 1)])
def test_kernel_matches_the_torch_code_in_float64(iterations, detach_early, num_in, num_out):
    # 37 inputs leave a partial block of 16, 32 fill two; 16 outputs fill every lane.
    u, W = random_inputs(num_in, 3, num_out, seed=iterations)
    ours = kernel(u, W, iterations, detach_early)
    theirs = reference(u, W, iterations, detach_early)
    assert_same_routing(((u, W), ours), theirs, atol=1e-13)


@pytest.mark.parametrize("in_dim", [1, 5, 16])
@pytest.mark.parametrize(
    "dtype, tolerance", [(torch.float64, (0.0, 1e-13)), (torch.float32, (1e-4, 1e-6))]
)
def test_kernel_takes_any_input_width_up_to_16(in_dim, dtype, tolerance):
    # Also float32: its registers hold 8 or 16 lanes, so 5 and 16 fill them partly and twice.
    u, W = random_inputs(20, 5, 10, in_dim=in_dim, dtype=dtype)
    rtol, atol = tolerance
    assert_same_routing(((u, W), kernel(u, W)), reference(u, W), rtol=rtol, atol=atol)


def test_kernel_matches_procedure_1_written_plainly():
    u, W = random_inputs(6, 2, 3)
    v, c = kernel(u, W)
    v_ref, c_ref = reference(u, W, routing=lambda u_hat, r, _: reference_routing(u_hat, r))
    torch.testing.assert_close(v, v_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(c, c_ref, rtol=0, atol=1e-12)


def test_kernel_passes_gradcheck():
    u, W = random_inputs(5, 2, 3, in_dim=3)
    assert torch.autograd.gradcheck(lambda u, W: kernel(u, W)[0], (u, W))


def test_float32_kernel_agrees_with_the_torch_code():
    u, W = random_inputs(1152, 4, 10, dtype=torch.float32, scale=0.05)
    ours = kernel(u, W)
    assert ours[0].dtype == ours[1].dtype == torch.float32
    assert torch.allclose(ours[1].sum(dim=1), torch.ones(4, 1152))
    assert_same_routing(((u, W), ours), reference(u, W), rtol=1e-4, atol=1e-6)


def test_bf16_capsules_route_in_float32_and_get_bf16_gradients():
    u, W = random_inputs(1152, 2, 10, scale=0.05)
    u = u.detach().bfloat16().requires_grad_()
    W = W.detach().float().requires_grad_()
    v, c = kernel(u, W)
    # The votes come from W rounded to bf16, as autocast's bf16 matmul makes them: with W in
    # float32 they would differ by up to 2^-9 and move v far beyond this tolerance.
    v_ref, c_ref = reference(u, W.bfloat16())
    assert v.dtype == torch.float32
    torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c, c_ref, rtol=1e-5, atol=1e-6)
    # Gradients: the kernel keeps grad u_hat in float32 where the torch code rounds it to bf16,
    # so both sit within bf16 rounding of the float64 truth for the same inputs.
    grad_v = torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
    exact = [x.detach().double().requires_grad_() for x in (u, W)]
    truths = torch.autograd.grad(reference(*exact)[0], exact, grad_v.double())
    dtypes = (torch.bfloat16, torch.float32)  # of grad u, and of grad W as of W
    for grad, truth, dtype in zip(torch.autograd.grad(v, (u, W), grad_v), truths, dtypes):
        assert grad.dtype == dtype
        scale = truth.abs().max().item()
        torch.testing.assert_close(grad.double(), truth, rtol=2**-7, atol=2**-8 * scale)


def test_kernel_refuses_what_it_cannot_route():
    u, W = random_inputs(5, 2, 3)
    with pytest.raises(ValueError, match="r >= 1"):
        kernel(u, W, iterations=0)
    with pytest.raises(ValueError, match="1 to 16 outputs"):
        kernel(*random_inputs(5, 2, 17))
    with pytest.raises(ValueError, match="inputs of 1 to 16 dimensions"):
        kernel(*random_inputs(5, 2, 3, in_dim=17))
    with pytest.raises(ValueError, match="does not match u"):
        kernel(u, W[:4])
    with pytest.raises(ValueError, match="W must be in the dtype"):
        kernel(u, W.detach().float())


def test_kernel_stays_finite_when_votes_are_huge():
    u, W = random_inputs(40, 2, 10, dtype=torch.float32, scale=1e6)
    v, c = kernel(u, W)
    v.sum().backward()
    assert torch.isfinite(v).all() and torch.isfinite(c).all()
    assert torch.isfinite(u.grad).all() and torch.isfinite(W.grad).all()


def test_one_thread_routes_several_groups_of_examples_right():
    # One thread takes all 9 examples: a full group of 8 and a partial one.
    u, W = random_inputs(37, 9, 10, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ours = kernel(u, W)
        assert_same_routing(((u, W), ours), reference(u, W), atol=1e-13)
    finally:
        torch.set_num_threads(threads)


def assert_same_bits_on_1_and_3_threads(outputs):
    """outputs() on 1 thread, then on 3: each tensor it returns has the same bits."""
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            results.append(outputs())
    finally:
        torch.set_num_threads(threads)
    for one, other in zip(*results):
        assert torch.equal(one, other)


def test_threads_split_batch_and_inputs_without_changing_a_bit():
    u, W = random_inputs(100, 7, 10, dtype=torch.float32)

    def outputs():
        v, c = kernel(u, W)
        return v, c, *torch.autograd.grad(v.square().sum(), (u, W))

    assert_same_bits_on_1_and_3_threads(outputs)


def digit_caps_both_ways(batch: int, bf16: bool) -> list[tuple]:
    """DigitCaps' (v, c, grad u, grad W) on the kernel, then in the torch code, on one input."""
    torch.manual_seed(0)
    layer = DigitCaps(CapsNetConfig())
    u = (0.1 * torch.randn(batch, 1152, 8)).requires_grad_()
    calls = fused_routing.kernel_calls
    outputs = []
    for enabled in (True, False):
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
        with fused_routing.kernel_enabled(enabled), autocast:
            v, c = layer(u)
        grads = torch.autograd.grad(v.square().sum(), (u, layer.W))
        outputs.append((v, c, *grads))
    assert fused_routing.kernel_calls == calls + 1  # the first arm, and only it, took the kernel
    assert fused_routing.is_enabled()
    return outputs


def test_digit_caps_on_the_kernel_matches_the_torch_code():
    for ours, theirs in zip(*digit_caps_both_ways(5, bf16=False)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_digit_caps_under_bf16_autocast_matches_the_torch_code():
    kernel, torch_code = digit_caps_both_ways(3, bf16=True)
    assert kernel[0].dtype == torch.float32
    # Both round W to bf16 for the votes; the torch code rounds grad u_hat to bf16 too, where
    # the kernel keeps it float32.
    for ours, theirs in zip(kernel, torch_code):
        scale = theirs.abs().max().item()
        torch.testing.assert_close(ours, theirs, rtol=2**-6, atol=2**-7 * scale)


# --- the primary capsules' squash --------------------------------------------------------


def conv_output(dtype, batch=3, channels=40, height=5, width=7, seed=0):
    """A PrimaryCaps convolution's output (B, C*D, H, W) for five 8-D capsules a position, with
    a huge capsule (m = max |s_d| > 1 scales it), a zero one and one with a single component
    beyond 1; needing grad."""
    generator = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, channels, height, width, generator=generator, dtype=torch.float64)
    s[0, 0:8, 0, 0] *= 1e20
    s[1, 8:16, 2, 3] = 0
    s[2, 16:24, 4, 6] = 0.01
    s[2, 18, 4, 6] = 3.0
    return s.to(dtype).requires_grad_()


def primary_reference(s, dim=8):
    """PrimaryCaps' torch code: (B, C*D, H, W) -> (B, C*H*W, D), squashed in float32 or more."""
    batch, channels, height, width = s.shape
    u = s.view(batch, channels // dim, dim, height, width).permute(0, 1, 3, 4, 2)
    return squash(u.reshape(batch, -1, dim).to(torch.promote_types(s.dtype, torch.float32)))


def primary_squash(s, dim=8):
    return fused_routing.PrimarySquash.apply(s, dim, EPS)


@pytest.mark.parametrize(
    "dtype, atol", [(torch.float64, 1e-15), (torch.float32, 1e-6), (torch.bfloat16, 1e-6)]
)
def test_primary_squash_matches_the_torch_code(dtype, atol):
    s = conv_output(dtype)
    ours, theirs = primary_squash(s), primary_reference(s)
    assert ours.dtype == theirs.dtype == torch.promote_types(dtype, torch.float32)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=atol)
    grad_u = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1), dtype=ours.dtype)
    (grad,), (grad_ref,) = (torch.autograd.grad(u, s, grad_u) for u in (ours, theirs))
    assert grad.dtype == dtype
    # bf16 gradients may round to neighbouring values: one step of bf16's 8 bits.
    rtol = 2**-8 if dtype == torch.bfloat16 else 0
    torch.testing.assert_close(grad, grad_ref, rtol=rtol, atol=100 * atol)


def test_primary_squash_passes_gradcheck_and_keeps_nan_in_its_capsule():
    s = conv_output(torch.float64, channels=24)
    assert torch.autograd.gradcheck(primary_squash, (s,), fast_mode=True)
    s = s.detach().clone()
    s[1, 9, 2, 1] = float("nan")  # capsule (channel 1, row 2, col 1) of example 1
    u = primary_squash(s)
    nan = torch.zeros_like(u, dtype=torch.bool)
    nan[1, 1 * 35 + 2 * 7 + 1] = True
    assert torch.equal(u.isnan(), nan)
    torch.testing.assert_close(u[~nan], primary_reference(s)[~nan], rtol=0, atol=1e-15)


def test_primary_squash_splits_among_threads_without_changing_a_bit():
    s = conv_output(torch.bfloat16)

    def outputs():
        u = primary_squash(s)
        return u, *torch.autograd.grad(u.square().sum(), s)

    assert_same_bits_on_1_and_3_threads(outputs)


def test_primary_caps_squash_in_the_kernel_unless_it_is_off(monkeypatch):
    layer = PrimaryCaps(CapsNetConfig(conv1_channels=16, primary_channels=4))
    x = torch.randn(2, 16, 20, 20)
    calls, apply = [], fused_routing.PrimarySquash.apply
    monkeypatch.setattr(
        fused_routing.PrimarySquash, "apply", lambda *args: calls.append(args) or apply(*args)
    )
    on = layer(x)
    with fused_routing.kernel_enabled(False):
        off = layer(x)
    assert len(calls) == 1
    torch.testing.assert_close(on, off, rtol=0, atol=1e-6)
    with fused_routing.kernel_enabled(False):  # the torch code squashes float64 in float64
        assert layer.double()(x.double()).dtype == torch.float64
    with pytest.raises(ValueError, match="12 channels do not split into 8-D capsules"):
        primary_squash(torch.randn(2, 12, 3, 3))


# --- the PrimaryCaps convolution's input gradient -----------------------------------------


def input_gradient_case(batch, channels, out_channels, side, kernel, stride, seed=0):
    """x's shape, a weight (O, C, KH, KW) and a grad_out (B, O, OH, OW) for a convolution."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_channels, channels, *kernel, generator=generator)
    out_side = [(side - k) // step + 1 for k, step in zip(kernel, stride)]
    grad_out = torch.randn(batch, out_channels, *out_side, generator=generator)
    return torch.Size([batch, channels, side, side]), weight, grad_out


@pytest.mark.parametrize(
    "batch, channels, out_channels, side, kernel, stride",
    [
        (3, 5, 4, 20, (9, 9), (2, 2)),  # 405 columns: a part panel; x's last row goes unread
        (2, 16, 7, 21, (9, 9), (2, 2)),  # 49 positions: a part tile
        (5, 3, 8, 12, (3, 5), (1, 1)),  # a kernel wider than tall, stride 1
        (1, 2, 3, 16, (9, 9), (3, 2)),  # strides that differ
        (9, 32, 16, 20, (9, 9), (2, 2)),  # 9 examples: groups of 4, 4 and 1
    ],
)
def test_conv_input_gradient_matches_autograd(batch, channels, out_channels, side, kernel, stride):
    shape, weight, grad_out = input_gradient_case(
        batch, channels, out_channels, side, kernel, stride
    )
    ours = fused_routing.conv_input_gradient(shape, weight, grad_out, stride)
    exact = torch.nn.grad.conv2d_input(shape, weight.double(), grad_out.double(), stride=stride)
    assert ours.dtype == torch.float32 and ours.shape == shape
    torch.testing.assert_close(ours, exact.float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(ours == 0, exact == 0)  # what the convolution never reads gets 0
    restrided = grad_out.contiguous(memory_format=torch.channels_last)
    assert torch.equal(fused_routing.conv_input_gradient(shape, weight, restrided, stride), ours)


def test_conv_input_gradient_refuses_shapes_that_do_not_fit():
    shape, weight, grad_out = input_gradient_case(2, 4, 3, 20, (9, 9), (2, 2))
    for wrong in (
        (torch.Size([2, 4, 22, 20]), weight, grad_out, (2, 2)),  # 7 rows out, not 6
        (shape, weight[:, :3], grad_out, (2, 2)),  # 3 input channels, not 4
        (shape, weight, grad_out[:1], (2, 2)),  # one example, not 2
        (shape, weight, grad_out, (1, 2)),  # stride 1 makes 12 rows
        (torch.Size([2, 4, 8, 8]), weight, grad_out, (2, 2)),  # smaller than the kernel
    ):
        with pytest.raises(ValueError, match="is not the output of a weight"):
            fused_routing.conv_input_gradient(*wrong)


def test_conv_input_gradient_splits_among_threads_without_changing_a_bit():
    shape, weight, grad_out = input_gradient_case(7, 16, 8, 20, (9, 9), (2, 2))
    stride = (2, 2)
    assert_same_bits_on_1_and_3_threads(
        lambda: (fused_routing.conv_input_gradient(shape, weight, grad_out, stride),)
    )


def test_primary_caps_input_gradient_in_the_kernel_in_float32_unless_it_is_off(monkeypatch):
    layer = PrimaryCaps(CapsNetConfig(conv1_channels=16, primary_channels=4))
    x = torch.randn(2, 16, 20, 20, requires_grad=True)
    calls, gradient = [], fused_routing.conv_input_gradient
    monkeypatch.setattr(
        fused_routing, "conv_input_gradient", lambda *args: calls.append(args) or gradient(*args)
    )

    def input_gradient(x):
        return torch.autograd.grad(layer.conv(x).square().sum(), x)[0]

    on = input_gradient(x)
    with fused_routing.kernel_enabled(False):
        off = input_gradient(x)
    assert len(calls) == 1
    torch.testing.assert_close(on, off)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        input_gradient(x)
    assert len(calls) == 1  # bf16 autocast keeps autograd's gradients


def test_other_capsule_widths_route_with_the_torch_code():
    model = CapsNet(CapsNetConfig(digit_dim=8, conv1_channels=16, primary_channels=4))
    u = torch.randn(2, model.config.num_primary_caps, 8)
    assert not fused_routing.usable(u, u.dtype, 10, 8)
    assert not fused_routing.usable(u[..., :0], u.dtype, 10, 16)  # 0-D inputs
    lengths, reconstructions, v = model(torch.rand(2, 1, 28, 28))
    assert v.shape == (2, 10, 8) and torch.isfinite(lengths).all()


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


@pytest.mark.slow  # a build into a fresh cache: 4 s on Zen 4, 11 s on Zen 3
def test_a_damaged_cached_build_is_built_again_and_lands_whole(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSNET_CACHE", str(tmp_path))
    fused_routing.library.cache_clear()
    try:
        damaged = fused_routing.cached_build(fused_routing.compiler_name())
        damaged.write_bytes(b"not a shared library")
        assert fused_routing.library() is not None
        assert damaged.read_bytes()[:4] == b"\x7fELF"
        assert [built.name for built in tmp_path.glob("routing-*.so")] == [damaged.name]
        assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # no build folder left
    finally:
        fused_routing.library.cache_clear()


def native_register_bytes() -> int:
    """The register width routing.cpp takes on this CPU: 64 bytes with AVX-512, else 32."""
    cpu_flags = cpu_fields(Path("/proc/cpuinfo")).get("flags", "").split()
    return 64 if "avx512f" in cpu_flags else 32


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads Linux's /proc/cpuinfo")
def test_the_kernel_keeps_its_sums_in_registers_of_the_width_asked():
    width = fused_routing.register_bytes or native_register_bytes()
    assert fused_routing.library().register_bytes() == width
    assert fused_routing.library().input_gradient_panel_float32() == 2 * width // 4  # 2 registers


# An AVX-512 CPU builds 64-byte registers: tiles of 6 x 32 columns, 8 doubles a register, one
# register a capsule. No CPU of this workplace's CI has AVX-512, so this runs that code here
# (GCC splits each 64-byte vector in two), and an AVX-512 CPU runs AVX2's code in turn.
@pytest.mark.slow  # this file's fast tests again, with a build of their own: 18-22 s on Zen 3
@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads Linux's /proc/cpuinfo")
def test_the_kernel_built_for_the_other_register_width_passes_these_tests():
    other = {32: 64, 64: 32}[native_register_bytes()]
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    command += ["-m", "not slow", __file__, "--kernel-register-bytes", str(other)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


TIMING_TOOL = "tools/routing_kernel_timing.py"


# Each source text is built once into the kernel's cache, so the copy and the suite's own
# routing reuse one build.
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_timing_tool_times_each_source_and_compares_their_outputs(tmp_path, dtype):
    same = tmp_path / "copy.cpp"
    shutil.copy(fused_routing.SOURCE, same)
    sizes = ("--inputs", 40, "--batch", 5, "--rounds", 1, "--repeats", 1, "--dtype", dtype)
    result = run_in_process(TIMING_TOOL, fused_routing.SOURCE, same, *sizes)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [record["source"] for record in records] == [str(fused_routing.SOURCE), str(same)]
    for record in records:
        assert (record["inputs"], record["batch"], record["dtype"]) == (40, 5, dtype)
        assert 0 < record["forward_ms"] < record["total_ms"]
        assert record["primary_squash_ms"] > 0 and record["primary_squash_backward_ms"] > 0
        differences = record["largest_difference_from_first"]
        assert set(differences) == {"v", "c", "grad_s", "v_t", "grad_u", "grad_W", "u", "grad_conv"}
        assert set(differences.values()) == {0.0}  # the same bits


def test_the_timing_tool_refuses_a_missing_or_broken_source_and_a_bad_count(tmp_path):
    broken = tmp_path / "broken.cpp"
    broken.write_text("not C++\n")
    refusals = {
        (broken,): f"{broken} does not compile: ",
        (tmp_path / "missing.cpp",): f"{tmp_path / 'missing.cpp'} does not exist",
        (tmp_path,): f"{tmp_path} is a folder, not a kernel source file",
        (fused_routing.SOURCE, "--batch", 0): "--batch must be at least 1, got 0",
    }
    for args, message in refusals.items():
        result = run_in_process(TIMING_TOOL, *args, check=False)
        assert result.returncode == 2 and result.stderr.count("\n") == 1
        assert_one_line_error(result, message)
