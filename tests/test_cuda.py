"""The CUDA path against the CPU, its plain reference. Skipped where no CUDA GPU is present
(CI has none); on a GPU machine, `python -m pytest tests/test_cuda.py` runs it."""

import json

import pytest
import torch

from capslab.checkpoint import load_checkpoint
from capslab.data import to_model_input
from capslab.training import TrainConfig, Trainer, epoch_generator
from CapsNet import CapsNet, DynamicRouting

from conftest import CPU, SMALL, SMALL_RUN, run_in_process

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 convolutions and matmuls round to 10 bits; the parity tests compare true float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("iterations", [1, 3])
def test_routing_on_cuda_matches_the_cpu_in_float64(iterations):
    torch.manual_seed(0)
    u_hat = torch.randn(4, 10, 1152, 16, dtype=torch.float64)  # (B, J, I, 16)
    grad_v = torch.randn(4, 10, 16, dtype=torch.float64)
    results = []  # per device: v, c, grad u_hat
    for device in (CPU, CUDA):
        x = u_hat.to(device).requires_grad_()
        v, c = DynamicRouting.apply(x, iterations, False)
        (grad,) = torch.autograd.grad(v, x, grad_v.to(device))
        results.append([t.cpu() for t in (v, c, grad)])
    for on_cpu, on_cuda in zip(*results):
        torch.testing.assert_close(on_cuda, on_cpu, rtol=1e-10, atol=1e-12)


def test_forward_on_cuda_matches_the_cpu(few_digits):
    torch.manual_seed(0)
    model = CapsNet(SMALL).eval()
    x = to_model_input(few_digits.images, CPU)  # (40, 1, 28, 28)
    with torch.no_grad():
        on_cpu = model(x)
        on_cuda = model.to(CUDA)(x.to(CUDA))
    for cuda_out, cpu_out in zip(on_cuda, on_cpu):
        torch.testing.assert_close(cuda_out.cpu(), cpu_out, rtol=1e-4, atol=1e-5)


def trainer_on(device: torch.device, folder, **settings) -> Trainer:
    """A Trainer of a seeded SMALL CapsNet (the same initial weights on any device)."""
    torch.manual_seed(0)
    return Trainer(TrainConfig(**settings), CapsNet(SMALL), device, 1, folder, quiet=True)


def test_training_step_on_cuda_matches_the_cpu(few_digits, tmp_path):
    """Same weights, batch and shifts: the same loss and gradients. (Not the updated weights:
    Adam's first step moves each weight by about lr whatever its gradient's size, so a
    vanishing gradient's rounding could flip it.)"""
    outcomes = []  # per device: loss, gradient norm, gradients
    for device in (CPU, CUDA):
        trainer = trainer_on(device, tmp_path / str(len(outcomes)), bf16=False)
        loss, grad_norm = trainer.train_step(
            few_digits.images, few_digits.labels, epoch_generator(0, 0)
        )
        grads = {
            name: p.grad.cpu() for name, p in trainer.model.named_parameters() if p.grad is not None
        }
        outcomes.append((loss, grad_norm, grads))
    (cpu_loss, cpu_norm, cpu_grads), (cuda_loss, cuda_norm, cuda_grads) = outcomes
    assert cuda_loss == pytest.approx(cpu_loss, rel=1e-4)
    assert cuda_norm == pytest.approx(cpu_norm, rel=1e-3)
    assert cuda_grads.keys() == cpu_grads.keys() and len(cpu_grads) > 0
    for name, grad in cpu_grads.items():
        torch.testing.assert_close(cuda_grads[name], grad, rtol=1e-3, atol=1e-6, msg=name)


def test_bf16_is_the_default_on_a_gpu_with_bf16_and_trains_finite_float32_weights(
    few_digits, tmp_path
):
    trainer = trainer_on(CUDA, tmp_path)
    assert trainer.config.bf16 is torch.cuda.is_bf16_supported()
    conv_dtypes = []
    trainer.model.conv1.conv.register_forward_hook(
        lambda module, inputs, out: conv_dtypes.append(out.dtype)
    )
    loss, grad_norm = trainer.train_step(
        few_digits.images, few_digits.labels, epoch_generator(0, 0)
    )
    expected = torch.bfloat16 if trainer.config.bf16 else torch.float32
    assert conv_dtypes == [expected]
    assert loss is not None and loss > 0 and grad_norm > 0
    assert all(p.dtype == torch.float32 and p.isfinite().all() for p in trainer.model.parameters())


def test_train_on_cuda_then_evaluate_and_resume_on_the_cpu(data_dir, tmp_path):
    """A checkpoint written on the GPU loads on a machine without one, scores the same there,
    and its run continues there."""
    folder = tmp_path / "run"
    common = ["--data-dir", data_dir, "--checkpoint-dir", folder, *SMALL_RUN]
    run_in_process("train.py", *common, "--epochs", 1, "--device", "cuda")
    saved = load_checkpoint(folder / "last.pt")
    assert saved["metrics"][-1]["machine"] == torch.cuda.get_device_name(CUDA)
    scores = [
        json.loads(
            run_in_process(
                "evaluate.py",
                *("--checkpoint", folder / "best.pt", "--data-dir", data_dir),
                *("--test-subset", 100, "--device", device, "--json"),
            ).stdout
        )["accuracy"]
        for device in ("cuda", "cpu")
    ]
    # The scripts keep TF32 convolutions on, so one near-tied digit of the 100 may flip.
    assert abs(scores[0] - scores[1]) <= 1.0
    run_in_process("train.py", *common, "--epochs", 2, "--device", "cpu", "--resume")
    resumed = load_checkpoint(folder / "last.pt")
    assert [r["epoch"] for r in resumed["metrics"]] == [1, 2]
