"""No NaN, no collapse, no lost checkpoint: extreme inputs, guards, atomic writes, a stress run."""

import math
import platform
from pathlib import Path

import pytest
import torch

from capslab import models, training
from capslab.checkpoint import load_checkpoint, save_checkpoint
from capslab.data import train_val_split
from capslab.errors import UserError
from capslab.hardware import cpu_name, has_native_bf16
from CapsNet import CapsNet, DynamicRouting, capsule_loss, squash

from conftest import make_trainer, train_in_process


@pytest.fixture(scope="module")
def paper_model():
    torch.manual_seed(0)
    return CapsNet()


@pytest.mark.parametrize("kind", ["zeros", "ones", "huge", "negative"])
def test_full_size_model_is_finite_on_extreme_inputs(paper_model, kind):
    x = {
        "zeros": torch.zeros(2, 1, 28, 28),
        "ones": torch.ones(2, 1, 28, 28),
        "huge": torch.rand(2, 1, 28, 28) * 1e4,
        "negative": -torch.rand(2, 1, 28, 28) * 1e4,
    }[kind]
    y = torch.tensor([3, 8])
    paper_model.zero_grad()
    lengths, reconstructions, v = paper_model(x, y)
    capsule_loss(lengths, reconstructions, x.clamp(0, 1), y).backward()
    assert torch.isfinite(lengths).all() and torch.isfinite(reconstructions).all()
    for name, parameter in paper_model.named_parameters():
        assert torch.isfinite(parameter.grad).all(), name


def test_routing_stays_finite_when_votes_are_huge():
    u_hat = (1e6 * torch.randn(2, 10, 40, 16)).requires_grad_()
    v, c = DynamicRouting.apply(u_hat, 3, False)
    v.sum().backward()
    assert torch.isfinite(v).all() and torch.isfinite(c).all() and torch.isfinite(u_hat.grad).all()


def test_routing_stays_float32_under_autocast(paper_model):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lengths, _, v = paper_model(torch.rand(2, 1, 28, 28))
    assert v.dtype == torch.float32 and lengths.dtype == torch.float32


def test_under_autocast_the_votes_are_bf16_products_handed_to_routing_in_float32(paper_model):
    u = squash(torch.randn(4, 1152, 8))  # (B, I, 8)
    exact = paper_model.digit_caps.votes(u)  # (B, J, I, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = paper_model.digit_caps.votes(u)
    assert rounded.shape == exact.shape == (4, 10, 1152, 16)
    assert rounded.dtype == torch.float32 and rounded.is_contiguous()
    assert not torch.equal(rounded, exact)  # W u in bf16, accumulated in float32
    torch.testing.assert_close(rounded, exact, rtol=0.02, atol=0.01 * exact.abs().max().item())


def test_routing_backward_stays_float32_where_backward_runs_under_autocast():
    u_hat = torch.randn(2, 10, 40, 16)
    grads = []
    for under_autocast in (False, True):
        leaf = u_hat.clone().requires_grad_()
        v, _ = DynamicRouting.apply(leaf, 3, False)
        loss = (v * torch.arange(16.0)).sum()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=under_autocast):
            loss.backward()
        grads.append(leaf.grad)
    assert grads[1].dtype == torch.float32
    assert torch.equal(grads[0], grads[1])


def test_bf16_training_step_runs_convolutions_in_bf16_and_keeps_float32_weights(
    mnist_train, tmp_path
):
    batch = train_val_split(mnist_train, 0, 32, seed=0)[0]
    losses, conv_dtypes = {}, []
    for bf16 in (False, True):
        trainer = make_trainer(tmp_path, bf16=bf16)
        trainer.model.conv1.conv.register_forward_hook(
            lambda module, inputs, out: conv_dtypes.append(out.dtype)
        )
        generator = training.epoch_generator(0, 0)
        losses[bf16], grad_norm = trainer.train_step(batch.images, batch.labels, generator)
        assert math.isfinite(grad_norm)
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert conv_dtypes == [torch.float32, torch.bfloat16]
    assert losses[True] == pytest.approx(losses[False], rel=0.02)


def nan_on_call(n: int):
    """A capsule_loss that returns NaN on its n-th call (1-based) and is exact otherwise."""
    calls = {"count": 0}

    def loss(*args, **kwargs):
        calls["count"] += 1
        value = capsule_loss(*args, **kwargs)
        return value * float("nan") if calls["count"] == n else value

    return loss


def cpuinfo_file(folder: Path, name: str, **fields: str) -> Path:
    """A two-processor /proc/cpuinfo whose processors hold these "key: value" fields."""
    block = "\n".join(f"{key.replace('_', ' ')}\t: {value}" for key, value in fields.items())
    path = folder / name
    path.write_text(f"processor\t: 0\n{block}\n\nprocessor\t: 1\n{block}\n\n")
    return path


def test_the_machine_name_tells_apart_cpus_a_virtual_machine_names_alike(tmp_path):
    """Under KVM, Zen 3 and Zen 4 are both "AMD EPYC"; their family, model and widest vector
    unit set their speed and whether bf16 is native, so the records must keep them."""
    zen3 = cpuinfo_file(
        tmp_path, "zen3", model_name="AMD EPYC", cpu_family="25", model="1", flags="sse avx2 fma"
    )
    zen4 = cpuinfo_file(
        tmp_path, "zen4", model_name="AMD EPYC", cpu_family="25", model="17",
        flags="avx2 avx512f avx512_bf16",
    )  # fmt: skip
    arm = cpuinfo_file(tmp_path, "arm", CPU_part="0xd0c", Features="fp asimd")
    assert cpu_name(zen3) == "AMD EPYC (family 25 model 1, AVX2)"
    assert cpu_name(zen4) == "AMD EPYC (family 25 model 17, AVX512-BF16)"
    assert cpu_name(arm) == platform.machine()  # no model name, family or x86 flags
    assert cpu_name(tmp_path / "absent") == (platform.processor() or platform.machine())


@pytest.mark.slow
def test_bf16_is_on_by_default_exactly_where_the_cpu_has_native_bf16(data_dir, tmp_path, capsys):
    """The default resolves to the CPU's own flags (Linux /proc/cpuinfo, the plain reference)
    and is saved as the bool that ran, and in each epoch's record beside the machine's name;
    --bf16 and --no-bf16 override it, and a forced, emulated bf16 is warned about."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("needs Linux's /proc/cpuinfo")
    flags = set(cpuinfo.read_text().split())
    assert has_native_bf16(torch.device("cpu")) == bool({"avx512_bf16", "amx_tile"} & flags)
    assert make_trainer(tmp_path).config.bf16 is has_native_bf16(torch.device("cpu"))
    for flag, expected in (
        ([], has_native_bf16(torch.device("cpu"))),
        (["--bf16"], True),
        (["--no-bf16"], False),
    ):
        saved = train_in_process(data_dir, tmp_path / str(flag), "--epochs", 1, *flag)
        assert saved["train_config"]["bf16"] is expected, flag
        record = saved["metrics"][-1]
        assert (record["bf16"], record["machine"]) == (expected, cpu_name()), flag
        warned = "warning: bf16 is emulated" in capsys.readouterr().err
        assert warned == (expected and not has_native_bf16(torch.device("cpu"))), flag


def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    data_dir, tmp_path, monkeypatch
):
    steps_per_epoch = 96 // 32
    monkeypatch.setattr(models, "capsule_loss", nan_on_call(steps_per_epoch + 2))
    with pytest.raises(UserError, match="non-finite loss or gradient at epoch 2 step 2"):
        train_in_process(data_dir, tmp_path, "--epochs", 3)
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["epoch"] == 1
    assert all(torch.isfinite(value).all() for value in last["model"].values())


@pytest.mark.slow
def test_skip_mode_counts_skipped_batches(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "capsule_loss", nan_on_call(2))
    last = train_in_process(data_dir, tmp_path, "--epochs", 1, "--on-nonfinite", "skip")
    assert last["skipped"] == 1 and last["metrics"][-1]["skipped"] == 1
    assert math.isfinite(last["metrics"][-1]["train_loss"])


@pytest.mark.parametrize("max_grad_norm", [None, 0.001])
def test_gradient_clipping_bounds_the_gradient_adam_steps_with(
    mnist_train, tmp_path, max_grad_norm
):
    batch = train_val_split(mnist_train, 0, 32, seed=0)[0]
    trainer = make_trainer(tmp_path, max_grad_norm=max_grad_norm)
    stepped_with = []
    trainer.optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: stepped_with.append(
            torch.nn.utils.get_total_norm([p.grad for p in trainer.model.parameters()]).item()
        )
    )
    _, logged = trainer.train_step(batch.images, batch.labels, training.epoch_generator(0, 0))
    assert logged > 0.001  # the norm is logged before clipping
    if max_grad_norm is None:
        assert stepped_with == [pytest.approx(logged)]
    else:
        assert stepped_with == [
            pytest.approx(max_grad_norm, rel=1e-3)
        ]  # clip divides by norm + 1e-6


@pytest.mark.slow
def test_mean_gradient_norm_is_logged(data_dir, tmp_path):
    last = train_in_process(data_dir, tmp_path, "--epochs", 1, "--max-grad-norm", "0.01")
    assert last["metrics"][-1]["grad_norm"] > 0.01


@pytest.mark.slow
def test_best_is_never_replaced_by_a_worse_model(data_dir, tmp_path):
    train_in_process(data_dir, tmp_path, "--epochs", 1)
    best_before = (tmp_path / "best.pt").read_bytes()
    checkpoint = load_checkpoint(tmp_path / "last.pt")
    checkpoint["best_val"] = 100.0  # pretend epoch 1 was perfect: epoch 2 cannot beat it
    save_checkpoint(checkpoint, tmp_path / "last.pt")
    train_in_process(data_dir, tmp_path, "--epochs", 2, "--resume")
    assert (tmp_path / "best.pt").read_bytes() == best_before
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 2


def test_broken_weights_are_never_saved(data_dir, tmp_path):
    trainer = make_trainer(tmp_path)
    with torch.no_grad():
        trainer.model.decoder.layers[0].weight[0, 0] = float("inf")
    with pytest.raises(UserError, match="not finite"):
        trainer.save("last.pt")
    assert not (tmp_path / "last.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("lr", [1e-3, 1e-2])
def test_stress_hundreds_of_steps_never_nan_never_collapse(mnist_train, lr, tmp_path):
    """480 steps of the real training step on 512 digits, at the default lr and 10x it."""
    subset, _ = train_val_split(mnist_train, 0, 512, seed=0)
    trainer = make_trainer(tmp_path, steps_per_epoch=512 // 32, lr=lr, batch_size=32, epochs=30)
    history = []
    for _ in range(trainer.config.epochs):
        assert trainer.train_epoch(subset, stop=type("NoStop", (), {"requested": False})())
        record = trainer.score_epoch(None, subset)
        trainer.close_epoch(record)
        assert math.isfinite(record["train_loss"]) and math.isfinite(record["grad_norm"])
        history.append(record["test_acc"])  # the test split here is the training subset
    best_so_far = [max(history[: k + 1]) for k in range(len(history))]
    assert max(history) > 90
    assert all(acc >= best - 5 for acc, best in zip(history, best_so_far)), history
