"""Beyond the paper's MNIST: routing diagnostics, affine robustness, the CNN baseline,
Fashion-MNIST end to end, and data-parallel training under torchrun."""

import functools
import math
import re
import subprocess
import sys

import pytest
import torch

import evaluate
from capslab.baseline import BaselineCNN, PaperCNN
from capslab.checkpoint import export_weights, load_checkpoint, model_from_checkpoint
from capslab.data import (
    AFFINE_FAMILIES,
    DEBIAN_FASHION_DIR,
    AffineParams,
    Split,
    random_affine,
    to_model_input,
)
from capslab.errors import UserError
from capslab.scoring import affine_accuracy, class_scores, report, routing_stats
from CapsNet import CapsNet

from conftest import CPU, REPO, SMALL, TINY_RUN, evaluate_json
from conftest import train_in_process as train_small

train_in_process = functools.partial(train_small, run_flags=TINY_RUN)


# --- routing diagnostics -------------------------------------------------------------------
def test_routing_stats_agree_with_plain_evaluation_and_leave_r_alone(small_model, few_digits):
    stats, predictions = routing_stats(small_model, few_digits, CPU)
    plain = class_scores(small_model, few_digits, CPU).argmax(dim=1)
    assert torch.equal(predictions, plain)
    assert small_model.digit_caps.iterations == 3
    assert list(stats["accuracy_by_iterations"]) == ["1", "2", "3", "5"]
    assert stats["accuracy_by_iterations"]["3"] == pytest.approx(
        100 * (plain == few_digits.labels).float().mean().item()
    )
    assert 0 <= stats["coupling_entropy"] <= math.log(10) + 1e-9
    assert 0 <= stats["coupling_std"] <= stats["coupling_std_max"] == pytest.approx(0.3)


@pytest.mark.parametrize("trained_r", [3, 4])
def test_routing_stats_score_each_r_as_a_model_built_with_that_r(few_digits, trained_r):
    """Rerouting the same votes with r iterations predicts what a model built with that r
    does. W at std 0.5 makes routing decisive, so r changes predictions (asserted), and each
    r is scored against labels that are its own model's predictions: 100% there, less at
    others."""

    def model_with(r: int) -> CapsNet:
        torch.manual_seed(0)  # the same weights for every r
        return CapsNet(SMALL, routing_iterations=r, weight_std=0.5)

    all_r = sorted({1, 2, 3, 5, trained_r})
    predicted = {r: class_scores(model_with(r), few_digits, CPU).argmax(dim=1) for r in all_r}
    assert not torch.equal(predicted[1], predicted[5])
    for r in all_r:
        labelled = Split(few_digits.images, predicted[r])
        stats, _ = routing_stats(model_with(trained_r), labelled, CPU)
        assert list(stats["accuracy_by_iterations"]) == [str(k) for k in all_r]
        for other, accuracy in stats["accuracy_by_iterations"].items():
            agree = (predicted[int(other)] == predicted[r]).float().mean().item()
            assert accuracy == pytest.approx(100 * agree)


def test_one_routing_iteration_is_uniform_and_input_independent(few_digits):
    torch.manual_seed(0)
    stats, _ = routing_stats(CapsNet(SMALL, routing_iterations=1), few_digits, CPU)
    assert stats["coupling_entropy"] == pytest.approx(math.log(10))
    assert stats["coupling_std"] == pytest.approx(0, abs=1e-12)


def test_silent_primary_capsules_count_as_never_active(small_model, few_digits):
    with torch.no_grad():
        small_model.primary_caps.conv.weight.zero_()
        small_model.primary_caps.conv.bias.zero_()
    stats, _ = routing_stats(small_model, few_digits, CPU)
    assert stats["never_active_fraction"] == 1 and stats["inactive_fraction_per_image"] == 1


def test_routing_stats_in_json_and_text(small_checkpoint, data_dir, capsys):
    flags = [
        "--checkpoint",
        small_checkpoint,
        "--data-dir",
        data_dir,
        "--test-subset",
        30,
        "--routing-stats",
    ]
    result = evaluate_json(capsys, *flags)
    assert result["total"] == 30 and result["routing"]["iterations"] == 3
    evaluate.main(list(map(str, flags)))
    text = capsys.readouterr().out
    assert "coupling entropy" in text and "r=5" in text and "never longer than 0.01" in text


# --- affine robustness ---------------------------------------------------------------------
def test_identity_affine_returns_the_image_and_translation_is_an_exact_shift(few_digits):
    x = to_model_input(few_digits.images[:4], CPU)  # (4, 1, 28, 28)
    params = AffineParams.draw(4, torch.Generator().manual_seed(0))
    assert torch.equal(random_affine(x, params.only("no family")), x)
    moved = random_affine(x, params.only("translation"))
    padded = torch.nn.functional.pad(x, (6,) * 4)  # (4, 1, 40, 40)
    for k, (dx, dy) in enumerate(params.offset.tolist()):
        expected = padded[k, :, 6 - dy : 34 - dy, 6 - dx : 34 - dx]
        torch.testing.assert_close(moved[k], expected, atol=1e-5, rtol=0)


def test_quarter_turn_about_the_centre_is_rot90(few_digits):
    x = to_model_input(few_digits.images[:2], CPU)
    params = AffineParams.draw(2, torch.Generator().manual_seed(0)).only("no family")
    params.angle = torch.full((2,), math.pi / 2, dtype=torch.float64)
    torch.testing.assert_close(
        random_affine(x, params), torch.rot90(x, -1, (2, 3)), atol=1e-5, rtol=0
    )


def test_affine_draws_stay_in_the_affnist_ranges():
    params = AffineParams.draw(10_000, torch.Generator().manual_seed(0))
    assert params.angle.abs().max() <= math.radians(20) and params.shear.abs().max() <= 0.2
    assert 0.8 <= params.scale.min() and params.scale.max() <= 1.2
    assert params.offset.abs().max() == 6


def test_affine_accuracy_is_seeded(small_model, few_digits, small_checkpoint, data_dir, capsys):
    digits = few_digits.subset(torch.arange(20))
    first = affine_accuracy(small_model, digits, CPU, seed=3)
    assert list(first) == list(AFFINE_FAMILIES)
    assert affine_accuracy(small_model, digits, CPU, seed=3) == first
    assert affine_accuracy(small_model, digits, CPU, seed=4) != first  # the seed is used
    result = evaluate_json(
        capsys,
        "--checkpoint",
        small_checkpoint,
        "--data-dir",
        data_dir,
        "--test-subset",
        20,
        "--affine",
        "--seed",
        3,
    )
    assert result["affine"] == {"seed": 3, "accuracy": pytest.approx(first)}


# --- the CNN baseline ----------------------------------------------------------------------
def test_baseline_parameter_count_is_the_documented_one():
    documented = int(
        re.search(r"([\d,]+) parameters", BaselineCNN.__doc__).group(1).replace(",", "")
    )
    assert sum(p.numel() for p in BaselineCNN().parameters()) == documented


@pytest.mark.slow  # seconds of training: the fast loop stays near a minute
def test_cnn_trains_checkpoints_and_evaluates(data_dir, tmp_path, capsys):
    checkpoint = train_in_process(data_dir, tmp_path / "cnn", "--epochs", 1, "--model", "cnn")
    assert checkpoint["model_kind"] == "cnn"
    export_weights(checkpoint, tmp_path / "cnn.pt")
    assert isinstance(model_from_checkpoint(load_checkpoint(tmp_path / "cnn.pt")), BaselineCNN)
    result = evaluate_json(
        capsys,
        "--checkpoint",
        tmp_path / "cnn.pt",
        "--data-dir",
        data_dir,
        "--test-subset",
        40,
        "--affine",
    )
    assert result["model_kind"] == "cnn"
    assert result["accuracy"] == pytest.approx(checkpoint["metrics"][-1]["test_acc"])
    with pytest.raises(UserError, match="--routing-stats needs a CapsNet checkpoint"):
        evaluate.main(
            [
                "--checkpoint",
                str(tmp_path / "cnn.pt"),
                "--data-dir",
                str(data_dir),
                "--routing-stats",
            ]
        )


def test_paper_cnn_is_the_papers_baseline():
    """Three 5x5 'same' convs of 256, 256, 128 channels, FC 328 and 192, 10 classes: the
    paper's 35.4M parameters, to the one."""
    model = PaperCNN()
    documented = int(re.search(r"([\d,]+) parameters", PaperCNN.__doc__).group(1).replace(",", ""))
    assert sum(p.numel() for p in model.parameters()) == documented == 35_445_522
    assert [conv.out_channels for conv in model.convs] == [256, 256, 128]
    assert all(conv.kernel_size == (5, 5) and conv.stride == (1, 1) for conv in model.convs)
    assert (model.fc1.out_features, model.fc2.out_features) == (328, 192)
    x = torch.rand(3, 1, 28, 28)
    features = x
    for conv in model.convs:
        features = conv(features)
    assert features.shape == (3, 128, 28, 28)  # 'same' padding keeps the image size
    (logits,) = model.eval()(x)
    assert logits.shape == (3, 10)
    model.train()
    torch.manual_seed(0)
    first = model(x)[0]
    torch.manual_seed(1)
    assert not torch.equal(first, model(x)[0])  # dropout acts in training only
    model.eval()
    assert torch.equal(model(x)[0], logits)


@pytest.mark.slow
def test_paper_cnn_trains_and_evaluates(data_dir, tmp_path, capsys):
    # One step of 32 digits: the 35M-parameter model is the slowest to train here.
    checkpoint = train_in_process(
        data_dir, tmp_path / "paper", "--epochs", 1, "--model", "paper-cnn", "--train-subset", 32
    )
    assert checkpoint["model_kind"] == "paper-cnn"
    model = model_from_checkpoint(checkpoint)
    assert isinstance(model, PaperCNN)
    assert not torch.equal(model.convs[0].weight, PaperCNN().convs[0].weight)
    result = evaluate_json(
        capsys, "--checkpoint", tmp_path / "paper" / "last.pt", "--data-dir", data_dir,
        "--test-subset", 40,
    )  # fmt: skip
    assert result["model_kind"] == "paper-cnn"
    assert result["accuracy"] == pytest.approx(checkpoint["metrics"][-1]["test_acc"])


def test_unknown_model_kind_is_a_clear_error(small_checkpoint):
    checkpoint = {**load_checkpoint(small_checkpoint), "model_kind": "resnet"}
    with pytest.raises(UserError, match="unknown model kind 'resnet'"):
        model_from_checkpoint(checkpoint)


# --- Fashion-MNIST -------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(
    not DEBIAN_FASHION_DIR.is_dir(),
    reason=f"{DEBIAN_FASHION_DIR} is missing (apt install dataset-fashion-mnist)",
)
def test_fashion_mnist_trains_and_evaluates_with_class_names(tmp_path, capsys):
    # An empty data dir: the Debian copy is read, nothing is downloaded.
    checkpoint = train_in_process(
        tmp_path / "data", tmp_path / "fashion", "--epochs", 1, "--dataset", "fashion-mnist"
    )
    assert checkpoint["dataset"] == "fashion-mnist"
    said = capsys.readouterr().out
    assert said.count(f"FashionMNIST/raw is absent: reading Debian's {DEBIAN_FASHION_DIR}") == 1
    evaluate.main(
        [
            "--checkpoint",
            str(tmp_path / "fashion" / "last.pt"),
            "--data-dir",
            str(tmp_path / "data"),
            "--test-subset",
            "40",
        ]
    )
    text = capsys.readouterr().out
    assert "dataset fashion-mnist" in text and "Ankle boot" in text and "T-shirt/top" in text


# --- data-parallel training ----------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(data_dir, tmp_path):
    # float32: bf16 rounds each process's half-batch differently, beyond this test's tolerance.
    flags = ["train.py", "--data-dir", data_dir, *TINY_RUN, "--epochs", 1, "--no-bf16"]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    result = subprocess.run(
        [*command, *map(str, flags), "--checkpoint-dir", tmp_path / "ddp"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("epoch 1/1") == 1 and "processes 2" in result.stdout  # rank 0 prints
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 1  # rank 0 logs
    parallel = load_checkpoint(tmp_path / "ddp" / "last.pt")
    single = train_in_process(data_dir, tmp_path / "single", "--epochs", 1, "--no-bf16")
    for key, value in single["model"].items():
        torch.testing.assert_close(parallel["model"][key], value, atol=1e-5, rtol=0, msg=key)
    assert parallel["metrics"][0]["train_loss"] == pytest.approx(
        single["metrics"][0]["train_loss"], rel=1e-5
    )
    assert parallel["metrics"][0]["test_acc"] == single["metrics"][0]["test_acc"]


def test_global_batch_must_split_evenly_over_processes(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="--batch-size 33 must be divisible"):
        train_in_process(data_dir, tmp_path, "--batch-size", 33)


def test_the_report_puts_true_classes_in_rows_and_scores_no_absent_class():
    labels, predictions = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 1, 1, 1, 0])
    result = report(labels, predictions, ["zero", "one", "two"])
    assert result["confusion_matrix"] == [[1, 1, 0], [1, 2, 0], [0, 0, 0]]  # row: true class
    assert result["correct"] == 3 and result["accuracy"] == 60.0 and result["error"] == 40.0
    assert result["per_class_accuracy"] == {
        "zero": 50.0,
        "one": pytest.approx(200 / 3),
        "two": None,
    }
