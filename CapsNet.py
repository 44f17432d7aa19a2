"""Capsule Network with dynamic routing.

Sabour, Frosst & Hinton, "Dynamic Routing Between Capsules", NIPS 2017, arXiv:1710.09829.

Faithful to the paper: Conv1 (256 9x9) -> PrimaryCaps (32 channels of 8-D capsules, 9x9
stride 2) -> DigitCaps (10 16-D capsules, Procedure 1 routing with r = 3) -> a 512-1024-784
decoder masked by the true label in training, and the margin loss (m+ = 0.9, m- = 0.1,
lambda = 0.5) plus 0.0005 x the summed squared reconstruction error.

Where this code departs from the paper (each is flagged again where it happens):
- `squash` and capsule lengths put a small epsilon inside the square root, so they stay
  finite (with finite gradients) at s = 0. The paper's formula is undefined there.
- `detach_early_routing` (off by default) stops gradients through u_hat in all but the last
  routing iteration, as some ports do. The paper lets gradients flow through every iteration.
- Mixed precision (the paper predates it): under bf16 autocast the convolutions, the votes
  W_ij u_i and the decoder compute in bf16; squash, routing and its backward stay float32.

On a CPU, with capslab/ beside this file, routing runs in a compiled kernel
(capslab/routing.cpp) with the same values and gradients as DynamicRouting, to float rounding.
"""

from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # beside capslab/, CPU routing runs in its compiled kernel; CapsNet.py alone runs without
    from capslab import fused_routing
except ImportError:
    fused_routing = None

EPS = 1e-8  # inside every square root, so norms have finite gradients at 0
CPU_ROUTING_PIECE = 16  # images routed at once on a CPU; see DigitCaps.forward


@dataclass(frozen=True)
class CapsNetConfig:
    in_channels: int = 1  # grayscale MNIST
    image_size: int = 28  # square input side in pixels
    num_classes: int = 10  # one digit capsule per class
    conv1_channels: int = field(  # paper: 256 9x9 kernels
        default=256, metadata={"help": "Conv1's channels; fewer make a faster, smaller model"}
    )
    kernel_size: int = 9  # both convolutions use 9x9 kernels
    primary_channels: int = field(  # paper: 32 channels of primary capsules
        default=32, metadata={"help": "channels (capsule types) of 8-D primary capsules"}
    )
    primary_dim: int = 8  # paper: 8-D primary capsules
    digit_dim: int = 16  # paper: 16-D digit capsules
    # The fields with help text are train.py's flags.
    routing_iterations: int = field(  # paper: r = 3
        default=3, metadata={"help": "routing iterations r"}
    )
    detach_early_routing: bool = field(  # not in the paper; see module docstring
        default=False,
        metadata={
            "help": "stop gradients through u_hat in all but the last routing iteration, as "
            "some public ports do; not in the paper"
        },
    )
    decoder_hidden: tuple[int, int] = (512, 1024)  # paper: FC 512 -> 1024 -> pixels
    weight_std: float = 0.01  # W_ij init; std 1 saturates routing and training never starts

    def __post_init__(self):
        """Refuse settings the model cannot be built from, with the field named."""
        positive = (
            "in_channels",
            "image_size",
            "num_classes",
            "conv1_channels",
            "kernel_size",
            "primary_channels",
            "primary_dim",
            "digit_dim",
            "routing_iterations",
        )
        for name in positive:
            check_positive_int(name, getattr(self, name))
        if not isinstance(self.detach_early_routing, bool):
            raise ValueError(
                f"detach_early_routing must be true or false, got {self.detach_early_routing!r}"
            )
        if not isinstance(self.decoder_hidden, (tuple, list)) or len(self.decoder_hidden) != 2:
            raise ValueError(
                f"decoder_hidden must be two layer widths, got {self.decoder_hidden!r}"
            )
        for width in self.decoder_hidden:
            check_positive_int("decoder_hidden", width)
        if isinstance(self.weight_std, bool) or not (
            isinstance(self.weight_std, (int, float)) and self.weight_std > 0
        ):
            raise ValueError(f"weight_std must be a positive number, got {self.weight_std!r}")
        if self.primary_grid < 1:
            raise ValueError(
                f"image_size {self.image_size} is too small for two {self.kernel_size}x"
                f"{self.kernel_size} convolutions"
            )

    @property
    def primary_grid(self) -> int:
        """Side of the PrimaryCaps grid: 28 -> 20 (conv1) -> 6 (stride-2 conv)."""
        conv1_side = self.image_size - self.kernel_size + 1
        return (conv1_side - self.kernel_size) // 2 + 1

    @property
    def num_primary_caps(self) -> int:
        """1152 = 32 * 6 * 6 for the paper's MNIST configuration."""
        return self.primary_channels * self.primary_grid**2


MAX_SIZE = 2**31 - 1  # beyond a C int, torch's kernels overflow rather than refuse


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIZE:
        raise ValueError(f"{name} must be a whole number from 1 to {MAX_SIZE:,}, got {value!r}")


def squash(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Eq. 1: v = |s|^2 / (1 + |s|^2) * s / |s|, with EPS inside the root (a departure).

    Finite, with finite gradients, for every finite input: |s|^2 overflows float32 once
    |s| > 1.8e19, so a vector whose largest component exceeds 1 is first divided by that
    component (t = s / m), and Eq. 1 is written in t and m. Below 1 nothing is scaled, so
    ordinary inputs give the unscaled formula's very numbers.
    """
    inv_scale = 1.0 / s.detach().abs().amax(dim=dim, keepdim=True).clamp(min=1.0)  # 1 / m
    t = s * inv_scale  # |t| <= 1; m is a constant to autograd, as it cancels out
    t_sq = (t * t).sum(dim=dim, keepdim=True)  # |s|^2 / m^2, at most the capsule's dimension
    inv_sq = inv_scale * inv_scale  # 1 / m^2, 0 where m^2 overflows
    # |s|^2 / (1 + |s|^2) / sqrt(|s|^2 + EPS) * s, each |s|^2 divided through by m^2.
    return t * (t_sq / (inv_sq + t_sq) / torch.sqrt(t_sq + EPS * inv_sq))


def capsule_length(v: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """|v| with EPS inside the root: sqrt has an infinite gradient at 0.

    Computed as m sqrt(|v / m|^2 + EPS / m^2), m the largest component (at least 1), so the
    squares cannot overflow; a length beyond the largest float saturates at it.
    """
    scale = v.detach().abs().amax(dim=dim, keepdim=True).clamp(min=1.0)  # m, (..., 1)
    t_sq = ((v / scale) ** 2).sum(dim=dim)  # |v|^2 / m^2
    scale = scale.squeeze(dim)
    length = scale * torch.sqrt(t_sq + EPS / (scale * scale))
    return torch.where(length.isinf(), torch.finfo(length.dtype).max, length)


def plain_geometry(conv: nn.Conv2d) -> bool:
    """The geometry the faster gradients below are written for: no padding or dilation, one
    group."""
    return conv.padding in ((0, 0), "valid") and conv.dilation == (1, 1) and conv.groups == 1


def float32_cpu_conv(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether `conv` may take its faster gradients below: float32 on a CPU outside autocast."""
    on_cpu = x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
    return plain_geometry(conv) and on_cpu and x.dtype == torch.float32


def bf16_cpu_autocast_conv(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether `conv` runs under bf16 autocast on a CPU, in the geometry of the gradients below,
    on an input autocast would run in bf16 (float32 or bf16: it leaves float64 as it is)."""
    autocast = (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )
    cast = x.dtype in (torch.float32, torch.bfloat16)
    return plain_geometry(conv) and x.device.type == "cpu" and autocast and cast


class ChannelsLastGradients(torch.autograd.Function):
    """F.conv2d (stride 1, no padding) with its gradients from oneDNN's channels-last kernels;
    the same numbers as autograd's. See ChannelsLastGradConv2d."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        layout = torch.channels_last  # x (B, 1, H, W) and weight (256, 1, 9, 9) restrided
        return torch.ops.aten.convolution_backward(
            grad_out,
            x.to(memory_format=layout),
            weight.to(memory_format=layout),
            bias_sizes=[weight.shape[0]],
            stride=[1, 1],
            padding=[0, 0],
            dilation=[1, 1],
            transposed=False,
            output_padding=[0, 0],
            groups=1,
            output_mask=list(ctx.needs_input_grad),
        )  # grad x, grad weight, grad bias: None where not needed


class ChannelsLastGradConv2d(nn.Conv2d):
    """Conv1's nn.Conv2d (stride 1, no padding). For a 1-channel image on a CPU in float32 its
    gradients come from oneDNN's channels-last kernels: such an image is NCHW and NHWC alike by
    its strides, and autograd hands it to oneDNN as NCHW, whose weight gradient for one input
    channel is slow (results/README.md § "Conv1's gradients in channels-last"). With more
    channels, under bf16 autocast (untimed) and elsewhere it is nn.Conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels == 1 and self.stride == (1, 1) and float32_cpu_conv(self, x):
            return ChannelsLastGradients.apply(x, self.weight, self.bias)
        return super().forward(x)


class PrimaryConvGradients(torch.autograd.Function):
    """F.conv2d (no padding) with faster gradients on a CPU in float32, the same numbers as
    autograd's to float rounding. The weight gradient is itself a forward convolution, run by
    oneDNN's forward kernel: the input's channels are its batch, the output gradient is its
    filter, dilated by the stride. The input gradient comes from the compiled kernel
    (fused_routing.conv_input_gradient) where it is built, else from autograd's own. See
    PrimaryConv2d."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride):
        ctx.save_for_backward(x, weight)
        ctx.stride = stride
        return F.conv2d(x, weight, bias, stride)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        needs_x, needs_weight, needs_bias, _ = ctx.needs_input_grad
        grad_x = grad_weight = grad_bias = None
        if needs_x and fused_routing and fused_routing.input_gradient_usable(grad_out):
            grad_x = fused_routing.conv_input_gradient(x.shape, weight, grad_out, ctx.stride)
        elif needs_x:
            grad_x = torch.nn.grad.conv2d_input(x.shape, weight, grad_out, stride=ctx.stride)
        if needs_weight:
            # Only the rows and columns the convolution reads (9x9, stride 2: not x's last).
            used = [
                (out - 1) * step + k
                for out, step, k in zip(grad_out.shape[2:], ctx.stride, weight.shape[2:])
            ]
            x_t = x[:, :, : used[0], : used[1]].transpose(0, 1).contiguous()  # (C, B, h, w)
            filters = grad_out.transpose(0, 1).contiguous()  # (O, B, H', W')
            grad_weight = F.conv2d(x_t, filters, dilation=ctx.stride)  # (C, O, k, k)
            grad_weight = grad_weight.transpose(0, 1)  # (O, C, k, k)
        if needs_bias:
            grad_bias = grad_out.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None


class PrimaryConv2d(nn.Conv2d):
    """The PrimaryCaps convolution's nn.Conv2d (no padding). On a CPU in float32, and under
    bf16 autocast on a CPU, its gradients are PrimaryConvGradients, which take less time than
    oneDNN's gradient kernels for this shape (results/README.md §§ "The PrimaryCaps weight
    gradient as a convolution", "The PrimaryCaps input gradient in the kernel" and "The kernel's
    AVX-512 code on Zen 4, and the PrimaryCaps weight gradient in bf16"). Elsewhere it is
    nn.Conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float32_cpu_conv(self, x):
            return PrimaryConvGradients.apply(x, self.weight, self.bias, self.stride)
        if bf16_cpu_autocast_conv(self, x):
            # Cast as autocast casts, outside the function: the parameters' gradients come
            # back through the casts in float32. The input gradient stays autograd's (the
            # kernel's is float32 only); the weight gradient is a bf16 forward convolution.
            with torch.autocast("cpu", enabled=False):
                tensors = [
                    t if t is None else t.to(torch.bfloat16) for t in (x, self.weight, self.bias)
                ]
                return PrimaryConvGradients.apply(*tensors, self.stride)
        return super().forward(x)


class ConvLayer(nn.Module):
    """Conv1: 256 9x9 filters, stride 1, ReLU."""

    def __init__(self, config: CapsNetConfig):
        super().__init__()
        self.conv = ChannelsLastGradConv2d(
            config.in_channels, config.conv1_channels, config.kernel_size
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, 28, 28) -> (B, 256, 20, 20)."""
        return F.relu(self.conv(x))


class PrimaryCaps(nn.Module):
    """32 channels of 8-D convolutional capsules (9x9, stride 2), squashed."""

    def __init__(self, config: CapsNetConfig):
        super().__init__()
        self.channels, self.dim = config.primary_channels, config.primary_dim
        self.conv = PrimaryConv2d(
            config.conv1_channels, self.channels * self.dim, config.kernel_size, stride=2
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 256, 20, 20) -> (B, 1152, 8): capsule i = (channel, row, col)."""
        out = self.conv(x)  # (B, 256, 6, 6)
        if fused_routing and fused_routing.squash_usable(out):
            # On a CPU, the compiled kernel: the same capsules, to float rounding, in one pass.
            return fused_routing.PrimarySquash.apply(out, self.dim, EPS)  # (B, 1152, 8)
        batch, _, height, width = out.shape
        # Each capsule is 8 channels at one position: split channels, then move them last.
        out = out.view(batch, self.channels, self.dim, height, width)  # (B, 32, 8, 6, 6)
        out = out.permute(0, 1, 3, 4, 2)  # (B, 32, 6, 6, 8)
        # Squashed in float32 (float64 for float64), also under autocast: bf16 elementwise
        # passes over the 1152 capsules cost more than the cast, and Eq. 1's norms keep their
        # precision.
        dtype = torch.promote_types(out.dtype, torch.float32)
        return squash(out.reshape(batch, -1, self.dim).to(dtype))  # (B, 1152, 8)


def votes_dtype(u: torch.Tensor, W: torch.Tensor) -> torch.dtype:
    """The dtype the votes' matmul W_ij u_i computes in: autocast's where it is on (bf16)."""
    if torch.is_autocast_enabled(u.device.type):
        return torch.get_autocast_dtype(u.device.type)
    return torch.promote_types(u.dtype, W.dtype)


class DigitCaps(nn.Module):
    """10 16-D capsules fed by dynamic routing (Procedure 1) from the primary capsules."""

    def __init__(self, config: CapsNetConfig):
        super().__init__()
        self.iterations = (
            config.routing_iterations
        )  # r; forward(..., iterations) scores with another
        self.detach_early = config.detach_early_routing
        num_in, num_out = config.num_primary_caps, config.num_classes
        # W_ij maps primary capsule i (8-D) to its vote for digit capsule j (16-D). Stored as
        # (I, 8, J*16) so all votes of one input capsule come from a single matmul.
        self.W = nn.Parameter(
            config.weight_std * torch.randn(num_in, config.primary_dim, num_out * config.digit_dim)
        )
        self.num_out, self.out_dim = num_out, config.digit_dim

    def votes(self, u: torch.Tensor) -> torch.Tensor:
        """Eq. 2's prediction vectors u_hat_j|i = W_ij u_i: (B, I, 8) -> (B, J, I, 16)."""
        return self.routing_layout(self.raw_votes(u))

    def raw_votes(self, u: torch.Tensor) -> torch.Tensor:
        """The votes as one matmul writes them: (B, I, 8) -> (I, B, J*16); bf16 under autocast."""
        return torch.bmm(u.transpose(0, 1), self.W)  # (I, B, 8) @ (I, 8, J*16) -> (I, B, J*16)

    def routing_layout(self, raw: torch.Tensor) -> torch.Tensor:
        """(I, B, J*16) -> (B, J, I, 16), where both routing contractions are batched
        matrix-vector products. Routing is float32 (float64 for float64 capsules): one copy
        moves u_hat there and casts bf16 votes alike."""
        num_in, batch, _ = raw.shape
        u_hat = raw.view(num_in, batch, self.num_out, self.out_dim)  # (I, B, J, 16)
        u_hat = u_hat.permute(1, 2, 0, 3)  # (B, J, I, 16)
        dtype = torch.promote_types(u_hat.dtype, torch.float32)
        return u_hat.to(dtype, memory_format=torch.contiguous_format).contiguous()

    def forward(
        self, u: torch.Tensor, iterations: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, I, 8) -> v_j (B, J, 16) and the final coupling coefficients c_ij (B, J, I).

        `iterations` overrides the config's r for this call only (routing diagnostics).
        """
        iterations = self.iterations if iterations is None else iterations
        check_positive_int("iterations", iterations)
        dtype = votes_dtype(u, self.W)
        if fused_routing and fused_routing.usable(u, dtype, self.num_out, self.out_dim):
            # On a CPU, the compiled kernel makes the votes and routes them: the same values,
            # to float rounding, without the votes' trips through memory.
            with torch.autocast(device_type="cpu", enabled=False):
                W = self.W.to(fused_routing.routing_dtype(dtype))  # float32: grad W stays float32
                args = (iterations, self.detach_early, EPS)
                return fused_routing.FusedRouting.apply(u.to(dtype), W, *args)
        raw = self.raw_votes(u)  # (I, B, J*16)
        # Routing is per example, so splitting the batch changes no value. On a CPU it pays:
        # u_hat is 737 KB per image and routing reads it 2r - 1 times, so a 16-image piece
        # (12 MB) stays in cache, where a whole batch of 128 (94 MB) streams from memory.
        piece = CPU_ROUTING_PIECE if u.device.type == "cpu" else len(u)
        pieces = raw.split(piece, dim=1)  # (I, b, J*16) each
        routed = [self.route(self.routing_layout(part), iterations) for part in pieces]
        v_j, c_ij = zip(*routed)  # per piece: v (b, J, 16), c (b, J, I)
        return torch.cat(v_j), torch.cat(c_ij)

    def route(self, u_hat: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Procedure 1 on float32 votes, float32 even under autocast: the logits b_ij grow, and
        softmax and the agreements need the range."""
        with torch.autocast(device_type=u_hat.device.type, enabled=False):
            return DynamicRouting.apply(u_hat, iterations, self.detach_early)


class DynamicRouting(torch.autograd.Function):
    """Procedure 1 with a hand-derived backward; same values and gradients as plain autograd.

    Autograd would keep one (B, J, I, 16) gradient per use of u_hat (2r - 1 of them) and add
    them up. Every one of those gradients is an outer product (a (B, J, I) weight times a
    (B, J, 16) vector), so backward stacks the weights and builds grad u_hat in one matmul.
    That, not arithmetic, is what routing costs on a CPU. tests/test_model.py checks this
    against a loop written from the paper, including gradcheck in float64.
    """

    @staticmethod
    def forward(ctx, u_hat: torch.Tensor, iterations: int, detach_early: bool):
        """u_hat (B, J, I, 16) -> v_j (B, J, 16), c_ij (B, J, I). b_ij is per example, per call."""
        batch, num_out, num_in, _ = u_hat.shape
        b_ij = torch.zeros(batch, num_out, num_in, device=u_hat.device, dtype=u_hat.dtype)
        saved = []
        for iteration in range(iterations):
            c_ij = torch.softmax(b_ij, dim=1)  # Eq. 3: over the outputs j, (B, J, I)
            s_j = (c_ij.unsqueeze(2) @ u_hat).squeeze(2)  # Eq. 2: sum_i c_ij u_hat, (B, J, 16)
            v_j = squash(s_j)  # Eq. 1, (B, J, 16)
            saved += [c_ij, s_j, v_j]
            if iteration < iterations - 1:  # r iterations: r squashes, r - 1 logit updates
                b_ij = b_ij + agreement(u_hat, v_j)  # + u_hat . v_j, (B, J, I)
        ctx.save_for_backward(u_hat, *saved)
        ctx.iterations, ctx.detach_early = iterations, detach_early
        ctx.mark_non_differentiable(c_ij)
        return v_j, c_ij

    @staticmethod
    def backward(ctx, grad_v: torch.Tensor, grad_c: torch.Tensor):
        """grad v_j (B, J, 16) -> grad u_hat (B, J, I, 16), walking the iterations backwards.
        float32, as forward was, even where backward() is called under autocast."""
        with torch.autocast(device_type=grad_v.device.type, enabled=False):
            return DynamicRouting.float32_backward(ctx, grad_v)

    @staticmethod
    def float32_backward(ctx, grad_v: torch.Tensor):
        u_hat, *saved = ctx.saved_tensors
        c, s, v = saved[0::3], saved[1::3], saved[2::3]
        weights, vectors = [], []  # grad u_hat = sum_k weights[k] (B,J,I) x vectors[k] (B,J,16)
        grad_b = None  # dL/db_{t+1}, which is also dL/d(agreement_t)
        last = ctx.iterations - 1
        for t in range(last, -1, -1):
            if t < last:
                # b_{t+1} = b_t + u_hat . v_t: v_t gets sum_i grad_b u_hat, u_hat gets grad_b v_t.
                grad_v = (grad_b.unsqueeze(2) @ u_hat).squeeze(2)  # (B, J, 16)
                weights.append(grad_b)
                vectors.append(v[t])
            grad_s = squash_backward(s[t], grad_v)  # (B, J, 16)
            weights.append(c[t])
            vectors.append(grad_s)
            if ctx.detach_early or t == 0:  # c_0 is uniform, and detached c_t carry no gradient
                break
            grad_c = agreement(u_hat, grad_s)  # (B, J, I)
            # Softmax over j: db = c * (dc - sum_j c dc); b_t also feeds b_{t+1}, so add grad_b.
            grad_b_t = c[t] * (grad_c - (c[t] * grad_c).sum(dim=1, keepdim=True))
            grad_b = grad_b_t if grad_b is None else grad_b + grad_b_t
        stacked_weights = torch.stack(weights, dim=-1)  # (B, J, I, K)
        stacked_vectors = torch.stack(vectors, dim=2)  # (B, J, K, 16)
        return stacked_weights @ stacked_vectors, None, None  # (B, J, I, 16)


def agreement(u_hat: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """u_hat . vector for every input: (B, J, I, 16), (B, J, 16) -> (B, J, I).

    Written as a row vector times u_hat transposed: the same numbers as u_hat @ a column
    vector, and several times faster on a CPU (results/README.md has the timing).
    """
    return (vector.unsqueeze(2) @ u_hat.transpose(-1, -2)).squeeze(2)


def squash_backward(s: torch.Tensor, grad_v: torch.Tensor) -> torch.Tensor:
    """Vector-Jacobian product of `squash` at s, by autograd on the small (B, J, 16) tensor."""
    with torch.enable_grad():
        s = s.detach().requires_grad_()
        (grad_s,) = torch.autograd.grad(squash(s), s, grad_v)
    return grad_s


class Decoder(nn.Module):
    """FC 512 -> 1024 -> pixels (sigmoid), fed the digit capsules masked to one class."""

    def __init__(self, config: CapsNetConfig):
        super().__init__()
        hidden1, hidden2 = config.decoder_hidden
        num_pixels = config.in_channels * config.image_size**2
        self.layers = nn.Sequential(
            nn.Linear(config.num_classes * config.digit_dim, hidden1),
            nn.ReLU(inplace=True),
            nn.Linear(hidden1, hidden2),
            nn.ReLU(inplace=True),
            nn.Linear(hidden2, num_pixels),
            nn.Sigmoid(),
        )
        self.image_shape = (config.in_channels, config.image_size, config.image_size)

    def forward(self, v: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """v (B, J, 16) and the class to keep (B,) -> reconstruction (B, C, N, N) in [0, 1]."""
        mask = F.one_hot(target, v.shape[1]).to(v.dtype)  # (B, J)
        masked = (v * mask.unsqueeze(-1)).flatten(1)  # (B, J*16)
        return self.layers(masked).view(-1, *self.image_shape)  # (B, C, N, N)


class CapsNet(nn.Module):
    """The full network. `CapsNet(routing_iterations=1)` overrides single config fields."""

    def __init__(self, config: CapsNetConfig | None = None, **overrides):
        super().__init__()
        self.config = replace(config or CapsNetConfig(), **overrides)
        self.conv1 = ConvLayer(self.config)
        self.primary_caps = PrimaryCaps(self.config)
        self.digit_caps = DigitCaps(self.config)
        self.decoder = Decoder(self.config)

    def capsules(
        self, x: torch.Tensor, routing_iterations: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, C, 28, 28) -> primary capsules u (B, 1152, 8), digit capsules v (B, J, 16)
        and the final coupling coefficients c_ij (B, J, 1152): the one way to the capsules,
        for training, scoring and the notebook alike."""
        u = self.primary_caps(self.conv1(x))  # (B, 1152, 8)
        v, c = self.digit_caps(u, routing_iterations)  # (B, J, 16), (B, J, 1152)
        return u, v, c

    def forward(
        self,
        x: torch.Tensor,
        target: torch.Tensor | None = None,
        routing_iterations: int | None = None,
        reconstruct: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """x (B, C, 28, 28) in [0, 1] -> lengths (B, J), reconstructions (B, C, 28, 28),
        v (B, J, 16).

        The decoder is masked by `target` (the true label, in training) or else by the
        longest capsule (the prediction, at test), so one pass gives both outputs. A target
        of K labels per example (B, K), as MultiMNIST's pairs have, decodes each from its own
        capsule: reconstructions (B, K, C, H, W).
        `routing_iterations` scores with another r than the config's, for this call only.
        `reconstruct=False` skips the decoder (reconstructions None), for training without
        the reconstruction loss.
        """
        _, v, _ = self.capsules(x, routing_iterations)  # (B, J, 16)
        lengths = capsule_length(v)  # (B, J)
        if not reconstruct:
            return lengths, None, v
        mask_class = lengths.argmax(dim=1) if target is None else target
        if mask_class.dim() == 2:  # one reconstruction per label: (B, K, C, H, W)
            batch, per_example = mask_class.shape  # K labels each, drawn in one pass of B*K rows
            drawn = self.decoder(v.repeat_interleave(per_example, dim=0), mask_class.flatten())
            return lengths, drawn.view(batch, per_example, *drawn.shape[1:]), v
        return lengths, self.decoder(v, mask_class), v


RECONSTRUCTION_WEIGHT = 0.0005  # the paper's scale-down of the SSE, so it does not dominate


def margin_loss(lengths: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 4, summed over classes: (B, J) and labels (B,) or (B, K) -> (B,). Hinges are
    squared. With K labels (MultiMNIST), T_k = 1 for each of them."""
    labels = target if target.dim() == 2 else target.unsqueeze(1)  # (B, K)
    present = F.one_hot(labels, lengths.shape[1]).amax(dim=1).to(lengths.dtype)  # T_k, (B, J)
    loss_present = present * F.relu(0.9 - lengths) ** 2  # m+ = 0.9
    loss_absent = 0.5 * (1.0 - present) * F.relu(lengths - 0.1) ** 2  # lambda = 0.5, m- = 0.1
    return (loss_present + loss_absent).sum(dim=1)


def reconstruction_loss(reconstructions: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Sum of squared pixel errors per example: (B, C, H, W) x2 -> (B,). MultiMNIST's
    (B, K, C, H, W), each digit's reconstruction against that digit alone, sums over the K."""
    return ((reconstructions - images) ** 2).flatten(1).sum(dim=1)


def capsule_loss(
    lengths: torch.Tensor,
    reconstructions: torch.Tensor | None,
    images: torch.Tensor,
    target: torch.Tensor,
    reconstruction_weight: float = RECONSTRUCTION_WEIGHT,
) -> torch.Tensor:
    """Margin loss + 0.0005 x reconstruction SSE, averaged over the batch (a scalar).

    `images` is what the decoder should draw: the input, or for MultiMNIST (target (B, 2)) each
    digit of the pair alone, (B, 2, C, H, W).

    With reconstruction_weight 0 (Table 1's rows "no reconstruction") it is the margin loss
    alone and `reconstructions` may be None.
    """
    per_example = margin_loss(lengths, target)  # (B,)
    if reconstruction_weight:
        if reconstructions is None:
            raise ValueError("reconstructions are None, but reconstruction_weight is not 0")
        sse = reconstruction_loss(reconstructions.float(), images)  # (B,)
        per_example = per_example + reconstruction_weight * sse
    return per_example.mean()
