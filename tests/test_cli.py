"""train.py and evaluate.py end to end on a small subset of real MNIST, resume, bad input."""

import json
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import REPO

import train
from common import export_weights, load_checkpoint

SMALL_RUN = ["--train-subset", "96", "--val-size", "64", "--test-subset", "100", "--batch-size", "32", "--quiet"]


def run(script: str, *args, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True, cwd=REPO
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_dir):
    """One small training run through the real CLI, shared by the tests below."""
    folder = tmp_path_factory.mktemp("run")
    result = run("train.py", "--data-dir", data_dir, "--checkpoint-dir", folder, "--epochs", 2, *SMALL_RUN)
    return folder, result.stdout


def test_train_writes_checkpoints_and_log(trained_run):
    folder, stdout = trained_run
    assert "epoch 2/2" in stdout and "img/s" in stdout
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[1]["lr"] == pytest.approx(0.9e-3)  # exponential decay per epoch
    checkpoint = load_checkpoint(folder / "last.pt")
    assert {"model", "optimizer", "scheduler", "epoch", "metrics", "config", "args"} <= checkpoint.keys()
    assert checkpoint["epoch"] == 2 and (folder / "best.pt").exists()
    assert (folder / "curve.png").stat().st_size > 1000


def test_curve_draws_before_the_first_test_score(tmp_path):
    # --test-every 5 leaves the first epochs without any accuracy to plot or put in a legend.
    records = [{"epoch": epoch, "train_loss": 1.0 / epoch} for epoch in (1, 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train.plot_curve(records, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 1000


def test_evaluate_reports_what_training_reported(trained_run, data_dir):
    folder, _ = trained_run
    best = load_checkpoint(folder / "best.pt")
    reported = best["metrics"][-1]["test_acc"]
    result = run("evaluate.py", "--checkpoint", folder / "best.pt", "--data-dir", data_dir, "--test-subset", 100, "--json")
    scored = json.loads(result.stdout)
    assert scored["accuracy"] == pytest.approx(reported, abs=1e-4)
    assert scored["total"] == 100 and sum(map(sum, scored["confusion_matrix"])) == 100


def test_evaluate_text_report_and_figures(trained_run, data_dir, tmp_path):
    folder, _ = trained_run
    result = run("evaluate.py", "--checkpoint", folder / "last.pt", "--data-dir", data_dir,
                 "--test-subset", 50, "--figures", tmp_path)
    assert "Test: accuracy" in result.stdout and "confusion matrix" in result.stdout
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 1000
    assert (tmp_path / "reconstructions.png").stat().st_size > 1000


def test_fresh_run_refuses_to_overwrite_a_previous_run(trained_run, data_dir):
    folder, _ = trained_run
    before = (folder / "last.pt").read_bytes()
    result = run("train.py", "--data-dir", data_dir, "--checkpoint-dir", folder, *SMALL_RUN, check=False)
    assert_one_line_error(result, "--resume")
    assert (folder / "last.pt").read_bytes() == before


def test_dry_run_saves_nothing(data_dir, tmp_path):
    result = run("train.py", "--data-dir", data_dir, "--checkpoint-dir", tmp_path, "--dry-run", *SMALL_RUN)
    assert "dry run" in result.stdout
    assert list(tmp_path.iterdir()) == []


def train_in_process(data_dir, folder, *extra, run_flags=SMALL_RUN):
    train.main(["--data-dir", str(data_dir), "--checkpoint-dir", str(folder), *run_flags, *map(str, extra)])
    return load_checkpoint(folder / "last.pt")


def assert_same_state(a: dict, b: dict) -> None:
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["metrics"][-1]["train_loss"] == b["metrics"][-1]["train_loss"]


def test_resume_reproduces_the_uninterrupted_run(data_dir, tmp_path):
    straight = train_in_process(data_dir, tmp_path / "straight", "--epochs", 2)
    train_in_process(data_dir, tmp_path / "resumed", "--epochs", 1)
    resumed = train_in_process(data_dir, tmp_path / "resumed", "--epochs", 2, "--resume")
    assert resumed["epoch"] == 2
    assert_same_state(straight, resumed)


def test_detach_early_routing_flag_reaches_the_model(data_dir, tmp_path):
    paper = train_in_process(data_dir, tmp_path / "paper", "--epochs", 1)
    detached = train_in_process(data_dir, tmp_path / "detached", "--epochs", 1, "--detach-early-routing")
    assert not paper["config"]["detach_early_routing"] and detached["config"]["detach_early_routing"]
    # Same seed, data and order: only the routing gradient differs, so the trained W must too.
    assert not torch.equal(paper["model"]["digit_caps.W"], detached["model"]["digit_caps.W"])


def test_interrupt_mid_epoch_saves_and_resumes_exactly(data_dir, tmp_path, monkeypatch):
    straight = train_in_process(data_dir, tmp_path / "straight", "--epochs", 1)

    class StopAfterTwoBatches:  # stands in for Ctrl-C pressed during the second batch
        def __init__(self):
            self.checks = 0

        @property
        def requested(self):
            self.checks += 1
            return self.checks >= 2

    monkeypatch.setattr(train, "StopRequest", StopAfterTwoBatches)
    interrupted = train_in_process(data_dir, tmp_path / "resumed", "--epochs", 1)
    assert (interrupted["epoch"], interrupted["step"]) == (0, 2)
    monkeypatch.undo()
    resumed = train_in_process(data_dir, tmp_path / "resumed", "--epochs", 1, "--resume")
    assert_same_state(straight, resumed)


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--epochs", "0"], "--epochs"),
        (["--lr", "-1"], "--lr"),
        (["--batch-size", "0"], "--batch-size"),
        (["--lr-decay", "1.5"], "--lr-decay"),
        (["--device", "tpu"], "tpu"),
        (["--train-subset", "999999"], "--train-subset"),
    ],
)
def test_train_rejects_bad_values(flags, fragment, data_dir, tmp_path):
    result = run("train.py", "--data-dir", data_dir, "--checkpoint-dir", tmp_path, *flags, check=False)
    assert_one_line_error(result, fragment)


def test_missing_data_offline_names_the_expected_path(tmp_path, monkeypatch):
    empty = tmp_path / "nowhere"
    result = run("evaluate.py", "--checkpoint", REPO / "tests" / "missing.pt", check=False)
    assert_one_line_error(result, "missing.pt")
    # Download is impossible here: point every mirror at an unreachable local port.
    code = (
        "import torchvision, train;"
        "torchvision.datasets.MNIST.mirrors = ['http://127.0.0.1:9/'];"
        f"train.exit_on_user_error(lambda: train.main(['--data-dir', {str(empty)!r}, '--checkpoint-dir', {str(tmp_path)!r}]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert_one_line_error(result, str(empty / "MNIST" / "raw"))


def test_resume_without_a_checkpoint_is_a_clear_error(data_dir, tmp_path):
    result = run("train.py", "--data-dir", data_dir, "--checkpoint-dir", tmp_path, "--resume", check=False)
    assert_one_line_error(result, "last.pt", "does not exist")


@pytest.mark.parametrize("kind", ["garbage", "empty", "not_capsnet", "pickled_object", "wrong_shapes"])
def test_evaluate_rejects_bad_checkpoints(kind, tmp_path, data_dir):
    path = tmp_path / f"{kind}.pt"
    if kind == "garbage":
        path.write_bytes(b"this is not a checkpoint" * 100)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "not_capsnet":
        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "pickled_object":
        torch.save({"model": {}, "config": {}, "args": __import__("argparse").Namespace(x=1)}, path)
    else:
        torch.save({"model": {"conv1.conv.weight": torch.zeros(2)}, "config": {"decoder_hidden": [512, 1024]}}, path)
    result = run("evaluate.py", "--checkpoint", path, "--data-dir", data_dir, check=False)
    assert_one_line_error(result, str(path))


def test_weights_only_checkpoint_continues_at_the_scheduled_lr(data_dir, tmp_path):
    first = train_in_process(data_dir, tmp_path / "first", "--epochs", 1)
    export_weights(first, tmp_path / "shipped.pt")
    assert "optimizer" not in load_checkpoint(tmp_path / "shipped.pt")
    continued = train_in_process(data_dir, tmp_path / "second", "--epochs", 2, "--resume", tmp_path / "shipped.pt")
    assert continued["epoch"] == 2
    assert [record["epoch"] for record in continued["metrics"]] == [1, 2]
    assert continued["metrics"][1]["lr"] == pytest.approx(0.9e-3)
