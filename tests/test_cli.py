"""train.py and evaluate.py end to end on a small subset of real MNIST, resume, bad input.

The scripts run in this process through their main(argv) (conftest.run_in_process): the same
stdout, stderr and exit status as `python train.py ...`, without importing torch each time.
trained_run, conftest's small run trained once per session, is shared by many tests here."""

import json
import shlex
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bench
import train
from capslab import fused_routing, hardware
from capslab.checkpoint import (
    epoch_text,
    epochs_before,
    epochs_in_all,
    export_weights,
    load_checkpoint,
)
from capslab.data import DEBIAN_FASHION_DIR, Split, first_images
from capslab.errors import UserError, flag_name
from capslab.figures import plot_curve
from capslab.run_plan import RESUMABLE

from conftest import (
    REPO,
    SMALL_RUN,
    StopAfterTwoBatches,
    assert_one_line_error,
    run_in_process,
    train_in_process,
)


def test_the_command_train_prints_last_scores_the_run_it_trained(trained_run):
    """Its data may not be in the default data/: the command names --data-dir."""
    folder, stdout = trained_run
    python, script, *args = shlex.split(stdout.split("done: ")[1].splitlines()[0])
    result = json.loads(run_in_process(script, *args, "--test-subset", 10, "--json").stdout)
    assert result["checkpoint"] == str(folder / "best.pt") and result["total"] == 10


def test_a_command_to_paste_quotes_its_paths():
    line = train.command(
        "evaluate.py", "--checkpoint", Path("my runs/é/best.pt"), "--data-dir", "d"
    )
    assert shlex.split(line) == [
        "python", "evaluate.py", "--checkpoint", "my runs/é/best.pt", "--data-dir", "d"
    ]  # fmt: skip


def test_train_writes_checkpoints_and_log(trained_run):
    folder, stdout = trained_run
    assert "epoch 2/2" in stdout and "img/s" in stdout
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[1]["lr"] == pytest.approx(0.9e-3)  # exponential decay per epoch
    checkpoint = load_checkpoint(folder / "last.pt")
    assert {
        "model",
        "optimizer",
        "scheduler",
        "epoch",
        "metrics",
        "config",
        "train_config",
    } <= checkpoint.keys()
    assert checkpoint["epoch"] == 2 and (folder / "best.pt").exists()
    assert_is_a_drawing(folder / "curve.png", (1100, 418))


def test_curve_draws_before_the_first_test_score(tmp_path):
    # --test-every 5 leaves the first epochs without any accuracy to plot or put in a legend.
    records = [{"epoch": epoch, "train_loss": 1.0 / epoch} for epoch in (1, 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_curve(records, tmp_path / "curve.png")
    assert_is_a_drawing(tmp_path / "curve.png", (1100, 418))


def test_evaluate_figures_of_fewer_than_16_test_digits(tiny_checkpoint, data_dir, tmp_path):
    result = run_in_process(
        "evaluate.py",
        *["--checkpoint", tiny_checkpoint, "--data-dir", data_dir],
        *["--test-subset", 5, "--figures", tmp_path, "--json"],
    )
    assert (tmp_path / "reconstructions.png").name in result.stdout
    assert_is_a_drawing(tmp_path / "reconstructions.png", (1760, 264))


def test_evaluate_on_another_dataset_than_the_models_says_so(tiny_checkpoint):
    if not DEBIAN_FASHION_DIR.is_dir():
        pytest.skip(f"Fashion-MNIST not installed in {DEBIAN_FASHION_DIR}")
    flags = ["--checkpoint", tiny_checkpoint, "--dataset", "fashion-mnist", "--test-subset", 8]
    text = run_in_process("evaluate.py", *flags).stdout
    assert "note: the model was trained on mnist, not fashion-mnist" in text
    # Where Fashion-MNIST came from (say_once's note) goes to stderr, and stdout stays JSON.
    result = json.loads(run_in_process("evaluate.py", *flags, "--json").stdout)
    assert (result["dataset"], result["trained_on"]) == ("fashion-mnist", "mnist")


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--test-subset", 0), "--test-subset must be at least 1, got 0"),
        (("--test-subset", -3), "--test-subset must be at least 1, got -3"),
        (("--test-subset", 10**6), "--test-subset must be between 1 and 10000, got 1000000"),
        (("--affine", "--seed", 10**23), f"--seed must be in 0 .. 2**32 - 1, got {10**23}"),
        (("--affine", "--seed", -1), "--seed must be in 0 .. 2**32 - 1, got -1"),
    ],
)
def test_evaluate_refuses_values_it_cannot_use(tiny_checkpoint, data_dir, flags, message):
    common = ["--checkpoint", tiny_checkpoint, "--data-dir", data_dir]
    result = run_in_process("evaluate.py", *common, *flags, check=False)
    assert_one_line_error(result, message)


def test_evaluate_figures_into_a_file_is_refused_before_scoring(tiny_checkpoint, data_dir):
    result = run_in_process(
        "evaluate.py",
        *["--checkpoint", tiny_checkpoint, "--data-dir", data_dir],
        *["--figures", REPO / "evaluate.py"],
        check=False,
    )
    assert_one_line_error(result, "--figures", "is a file, not a folder")
    assert result.stdout == ""


def test_evaluate_figures_into_a_folder_that_takes_no_files_is_refused_before_scoring(
    tiny_checkpoint, data_dir, unwritable_folder
):
    result = run_in_process(
        "evaluate.py",
        *["--checkpoint", tiny_checkpoint, "--data-dir", data_dir],
        *["--figures", unwritable_folder],
        check=False,
    )
    assert_one_line_error(result, f"--figures {unwritable_folder} cannot be written")
    assert result.stdout == ""


def test_evaluate_reports_what_training_reported(trained_run, data_dir):
    folder, _ = trained_run
    best = load_checkpoint(folder / "best.pt")
    reported = best["metrics"][-1]["test_acc"]
    result = run_in_process(
        "evaluate.py",
        "--checkpoint",
        folder / "best.pt",
        "--data-dir",
        data_dir,
        "--test-subset",
        100,
        "--json",
    )
    scored = json.loads(result.stdout)
    assert scored["accuracy"] == pytest.approx(reported, abs=1e-4)
    assert scored["total"] == 100 and sum(map(sum, scored["confusion_matrix"])) == 100


def test_evaluate_text_report_and_figures(trained_run, data_dir, tmp_path):
    folder, _ = trained_run
    result = run_in_process(
        "evaluate.py",
        "--checkpoint",
        folder / "last.pt",
        "--data-dir",
        data_dir,
        "--test-subset",
        50,
        "--figures",
        tmp_path,
    )
    assert "Test: accuracy" in result.stdout and "confusion matrix" in result.stdout
    assert_is_a_drawing(tmp_path / "confusion_matrix.png", (660, 550))
    assert_is_a_drawing(tmp_path / "reconstructions.png", (1760, 264))
    # The top row shows the first 16 test digits: their columns hold ink, the margins do not.
    pixels = np.asarray(Image.open(tmp_path / "reconstructions.png").convert("L"), dtype=float)
    assert pixels.std() > 20


def assert_is_a_drawing(path, size: tuple[int, int]) -> None:
    """A PNG of the size its figsize and dpi give, with more on it than a blank canvas."""
    image = Image.open(path)
    assert image.format == "PNG" and image.size == size
    colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 50  # text, lines and images are anti-aliased: many shades


def test_fresh_run_refuses_to_overwrite_a_previous_run(trained_run, data_dir):
    folder, _ = trained_run
    before = (folder / "last.pt").read_bytes()
    result = run_in_process(
        "train.py", "--data-dir", data_dir, "--checkpoint-dir", folder, *SMALL_RUN, check=False
    )
    assert_one_line_error(result, "--resume")
    assert (folder / "last.pt").read_bytes() == before


def test_fresh_run_refuses_to_overwrite_a_kept_best_checkpoint(trained_run, data_dir, tmp_path):
    # last.pt (the large file) deleted, best.pt kept: a new run would replace it after epoch 1.
    best = tmp_path / "best.pt"
    best.write_bytes((trained_run[0] / "best.pt").read_bytes())
    result = train_cli(data_dir, tmp_path, *SMALL_RUN, check=False)
    assert_one_line_error(result, "best.pt already exists", "--resume")
    assert best.read_bytes() == (trained_run[0] / "best.pt").read_bytes()


def test_dry_run_saves_nothing(data_dir, tmp_path):
    result = run_in_process(
        "train.py", "--data-dir", data_dir, "--checkpoint-dir", tmp_path, "--dry-run", *SMALL_RUN
    )
    assert "dry run" in result.stdout
    assert list(tmp_path.iterdir()) == []


def assert_same_state(a: dict, b: dict) -> None:
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["metrics"][-1]["train_loss"] == b["metrics"][-1]["train_loss"]


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(data_dir, tmp_path, trained_run):
    straight = load_checkpoint(trained_run[0] / "last.pt")  # SMALL_RUN, --epochs 2
    train_in_process(data_dir, tmp_path / "resumed", "--epochs", 1)
    resumed = train_in_process(data_dir, tmp_path / "resumed", "--epochs", 2, "--resume")
    assert resumed["epoch"] == 2
    assert_same_state(straight, resumed)


@pytest.mark.slow
def test_detach_early_routing_flag_reaches_the_model(data_dir, tmp_path):
    paper = train_in_process(data_dir, tmp_path / "paper", "--epochs", 1)
    detached = train_in_process(
        data_dir, tmp_path / "detached", "--epochs", 1, "--detach-early-routing"
    )
    assert (
        not paper["config"]["detach_early_routing"] and detached["config"]["detach_early_routing"]
    )
    # Same seed, data and order: only the routing gradient differs, so the trained W must too.
    assert not torch.equal(paper["model"]["digit_caps.W"], detached["model"]["digit_caps.W"])


@pytest.mark.slow
def test_interrupt_mid_epoch_saves_and_resumes_exactly(data_dir, tmp_path, monkeypatch):
    straight = train_in_process(data_dir, tmp_path / "straight", "--epochs", 1)

    monkeypatch.setattr(train, "StopRequest", StopAfterTwoBatches)
    interrupted = train_in_process(data_dir, tmp_path / "resumed", "--epochs", 1)
    assert (interrupted["epoch"], interrupted["batches_done"]) == (0, 2)
    monkeypatch.undo()
    resumed = train_in_process(data_dir, tmp_path / "resumed", "--epochs", 1, "--resume")
    assert_same_state(straight, resumed)


def test_an_interrupted_dry_run_says_it_saved_nothing(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "StopRequest", StopAfterTwoBatches)
    folder = tmp_path / "run"
    flags = ["--data-dir", data_dir, "--checkpoint-dir", folder, *SMALL_RUN, "--dry-run"]
    printed = run_in_process("train.py", *flags).stdout
    assert "interrupted: dry run, nothing saved" in printed and "--resume" not in printed
    assert not folder.exists()


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--epochs", "0"], "--epochs"),
        (["--lr", "-1"], "--lr"),
        (["--batch-size", "0"], "--batch-size"),
        (["--lr-decay", "1.5"], "--lr-decay"),
        (["--device", "tpu"], "tpu"),
        (["--train-subset", "999999"], "--train-subset"),
        (["--seed", "-1"], "--seed must be in 0 .. 2**32 - 1"),
        (["--routing-iterations", str(10**20)], "--routing-iterations must be a whole number from"),
        (["--conv1-channels", str(2**31)], "--conv1-channels must be a whole number from 1 to"),
        (["--primary-channels", str(2**31 - 1)], "parameters: training needs"),
    ],
)
def test_train_rejects_bad_values(flags, fragment, data_dir, tmp_path):
    result = run_in_process(
        "train.py", "--data-dir", data_dir, "--checkpoint-dir", tmp_path, *flags, check=False
    )
    assert_one_line_error(result, fragment)


def test_missing_data_offline_names_the_expected_path(tmp_path, monkeypatch):
    empty = tmp_path / "nowhere"
    result = run_in_process(
        "evaluate.py", "--checkpoint", REPO / "tests" / "missing.pt", check=False
    )
    assert_one_line_error(result, "missing.pt")
    # Download is impossible here: point every mirror at an unreachable local port.
    monkeypatch.setattr("torchvision.datasets.MNIST.mirrors", ["http://127.0.0.1:9/"])
    result = run_in_process(
        "train.py", "--data-dir", empty, "--checkpoint-dir", tmp_path, check=False
    )
    assert_one_line_error(result, str(empty / "MNIST" / "raw"))


def test_resume_without_a_checkpoint_is_a_clear_error(data_dir, tmp_path):
    result = run_in_process(
        "train.py", "--data-dir", data_dir, "--checkpoint-dir", tmp_path, "--resume", check=False
    )
    assert_one_line_error(result, "last.pt", "does not exist")


@pytest.mark.parametrize(
    "kind", ["garbage", "empty", "not_capsnet", "pickled_object", "wrong_shapes"]
)
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
        torch.save(
            {
                "model": {"conv1.conv.weight": torch.zeros(2)},
                "config": {"decoder_hidden": [512, 1024]},
            },
            path,
        )
    result = run_in_process(
        "evaluate.py", "--checkpoint", path, "--data-dir", data_dir, check=False
    )
    assert_one_line_error(result, str(path))


@pytest.mark.slow
def test_weights_only_checkpoint_continues_at_the_scheduled_lr(data_dir, tmp_path):
    first = train_in_process(data_dir, tmp_path / "first", "--epochs", 1)
    export_weights({**first, "epochs_before": 4}, tmp_path / "shipped.pt")  # after --init-from
    assert "optimizer" not in load_checkpoint(tmp_path / "shipped.pt")
    continued = train_in_process(
        data_dir, tmp_path / "second", "--epochs", 2, "--resume", tmp_path / "shipped.pt"
    )
    assert continued["epoch"] == 2 and continued["epochs_before"] == 4
    assert [record["epoch"] for record in continued["metrics"]] == [1, 2]
    assert continued["metrics"][1]["lr"] == pytest.approx(0.9e-3)
    assert continued["best_val"] == max(record["val_acc"] for record in continued["metrics"])


@pytest.mark.slow
def test_init_from_starts_a_new_run_from_the_chosen_weights(data_dir, tmp_path):
    first = train_in_process(data_dir, tmp_path / "first", "--epochs", 1)
    export_weights(first, tmp_path / "shipped.pt")
    # A learning rate too small to move the weights: the run ends where it started.
    tuned = train_in_process(
        data_dir,
        tmp_path / "tuned",
        *["--init-from", tmp_path / "shipped.pt", "--epochs", 1, "--lr", "1e-12"],
        *["--schedule", "onecycle", "--ema-decay", 0],
    )
    assert [record["epoch"] for record in tuned["metrics"]] == [1]
    assert tuned["train_config"]["init_from"] == str(tmp_path / "shipped.pt")
    assert (first["epochs_before"], tuned["epochs_before"]) == (0, 1)  # the source's epoch
    scored = run_in_process(
        "evaluate.py", "--checkpoint", tmp_path / "tuned" / "best.pt", "--data-dir", data_dir,
        "--test-subset", 10,
    )  # fmt: skip
    assert "  epoch 1 (2 in all, 1 before --init-from)  " in scored.stdout.splitlines()[0]
    assert tuned["train_config"]["schedule"] == "onecycle"
    for name, weight in first["model"].items():
        torch.testing.assert_close(tuned["model"][name], weight, rtol=0, atol=1e-9)


def test_epochs_before_init_from_add_up_along_a_chain():
    scratch = {"epoch": 30, "epochs_before": 0, "train_config": {"init_from": None}}
    continued = {"epoch": 9, "epochs_before": 30, "train_config": {"init_from": "a.pt"}}
    assert (epochs_in_all(scratch), epochs_in_all(continued)) == (30, 39)
    assert epoch_text(9, epochs_before(continued)) == "epoch 9 (39 in all, 30 before --init-from)"
    older = {"epoch": 9, "train_config": {"init_from": "a.pt"}}  # saved before the count was kept
    assert epochs_before(older) is None and epochs_in_all(older) is None
    assert epoch_text(9, epochs_before(older)) == "epoch 9 (after --init-from)"
    assert epochs_before({"epoch": 5, "train_config": {}}) == 0  # from scratch, an older file
    assert epoch_text(5, 0) == "epoch 5"
    assert epoch_text(None, 3) == "epoch ?" and epochs_in_all({"epochs_before": 3}) is None


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--resume"], "pass only one of them"),
        (["--routing-iterations", "1"], "--routing-iterations cannot differ"),
        (["--model", "cnn"], "--model capsnet"),
        (["--dataset", "fashion-mnist"], "--dataset mnist"),
    ],
)
def test_init_from_refuses_flags_that_contradict_the_checkpoint(
    trained_run, data_dir, tmp_path, flags, named
):
    folder, _ = trained_run
    result = train_cli(
        data_dir, tmp_path, "--init-from", folder / "best.pt", "--dry-run", *flags, check=False
    )
    assert_one_line_error(result, named)


def test_init_from_warns_when_validation_may_hold_the_checkpoints_training_images(
    trained_run, data_dir, tmp_path
):
    folder, _ = trained_run
    same = train_cli(data_dir, tmp_path, "--init-from", folder / "best.pt", "--dry-run", *SMALL_RUN)
    other = train_cli(
        data_dir,
        tmp_path,
        *["--init-from", folder / "best.pt", "--dry-run", *SMALL_RUN, "--seed", "1"],
    )
    # A tiny model's validation is at chance, which training warns about: no other warning.
    warned = [line for line in same.stderr.splitlines() if "warning" in line]
    assert [line for line in warned if "is at chance" not in line] == [], same.stderr
    assert "trained on another split (--seed 0; this run: --seed 1)" in other.stderr


def test_export_cli_writes_the_chosen_weights_and_keeps_an_existing_file(trained_run, tmp_path):
    folder, _ = trained_run
    shipped = tmp_path / "shipped.pt"
    result = run_in_process("export.py", folder / "best.pt", shipped)
    exported, source = load_checkpoint(shipped), load_checkpoint(folder / "best.pt")
    chosen_epoch = max(source["metrics"], key=lambda record: record["val_acc"])
    weights = "averaged" if source.get("chosen") == "ema" else "raw"
    assert result.stdout.startswith(f"wrote {shipped} (") and result.stdout.endswith(
        f"): epoch {chosen_epoch['epoch']}, validation {chosen_epoch['val_acc']:.2f}%, "
        f"{weights} weights\n"
    )
    assert "optimizer" not in exported and exported["metrics"] == source["metrics"]
    chosen = source["ema"] if source.get("chosen") == "ema" else source["model"]
    assert all(torch.equal(exported["model"][name], chosen[name]) for name in chosen)
    before = shipped.read_bytes()
    refused = run_in_process("export.py", folder / "last.pt", shipped, check=False)
    assert_one_line_error(refused, "already exists", "--overwrite")
    onto_itself = run_in_process("export.py", shipped, shipped, "--overwrite", check=False)
    assert_one_line_error(onto_itself, "is both source and destination")
    assert shipped.read_bytes() == before
    under_a_file = run_in_process("export.py", folder / "best.pt", shipped / "x.pt", check=False)
    assert_one_line_error(under_a_file, f"could not write {shipped / 'x.pt'}")
    into_a_folder = run_in_process(
        "export.py", folder / "best.pt", tmp_path, "--overwrite", check=False
    )
    assert_one_line_error(into_a_folder, f"{tmp_path} is a folder: name the file to write")


def train_cli(data_dir, folder, *flags, check: bool = True):
    return run_in_process(
        "train.py", "--data-dir", data_dir, "--checkpoint-dir", folder, *flags, check=check
    )


def snapshot(folder) -> dict:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_resumed_dry_run_trains_nothing_real_and_saves_nothing(trained_run, data_dir):
    folder, _ = trained_run
    before = snapshot(folder)
    result = train_cli(data_dir, folder, "--resume", "--epochs", 3, "--dry-run", "--quiet")
    assert "dry run: 2 training and 2 evaluation batches" in result.stdout
    assert "nothing saved" in result.stdout and "epoch 3/3" in result.stdout
    assert snapshot(folder) == before


@pytest.mark.parametrize("epochs", [None, 1, 2])
def test_resuming_a_finished_run_says_there_is_nothing_to_resume(trained_run, data_dir, epochs):
    folder, _ = trained_run
    before = snapshot(folder)
    flags = [] if epochs is None else ["--epochs", epochs]
    result = train_cli(data_dir, folder, "--resume", *flags, check=False)
    budget = 2 if epochs is None else epochs
    assert_one_line_error(
        result, f"has trained 2 of --epochs {budget}: nothing to resume; raise --epochs"
    )
    assert snapshot(folder) == before


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--train-subset", "256"], "--train-subset"),
        (["--lr", "0.01"], "--lr"),
        (["--routing-iterations", "1"], "--routing-iterations"),
    ],
)
def test_resume_refuses_flags_it_cannot_honour(trained_run, data_dir, flags, named):
    folder, _ = trained_run
    before = snapshot(folder)
    result = train_cli(data_dir, folder, "--resume", *flags, check=False)
    assert_one_line_error(result, named, "cannot change")
    assert snapshot(folder) == before


@pytest.mark.slow
def test_resume_accepts_a_flag_repeated_with_its_saved_value(data_dir, tmp_path):
    # --ema-decay 0 is saved as None (off) and --adam-betas as a tuple: both still match.
    train_in_process(data_dir, tmp_path, "--epochs", 1, "--ema-decay", 0)
    resumed = train_in_process(
        data_dir,
        tmp_path,
        *["--epochs", 2, "--resume", "--lr", "0.001", "--ema-decay", 0],
        *["--adam-betas", 0.9, 0.999],
    )
    assert resumed["epoch"] == 2 and resumed["train_config"]["ema_decay"] is None


@pytest.mark.slow
def test_resume_into_a_folder_of_another_run_is_refused(trained_run, data_dir, tmp_path):
    folder, _ = trained_run
    other = tmp_path / "other"
    train_in_process(data_dir, other, "--epochs", 1)
    before = snapshot(other)
    result = run_in_process(
        "train.py",
        "--data-dir",
        data_dir,
        "--checkpoint-dir",
        other,
        "--resume",
        folder / "last.pt",
        check=False,
    )
    assert_one_line_error(result, "holds another run")
    assert snapshot(other) == before


def test_resume_help_names_every_flag_a_resume_may_change():
    text = " ".join(train.build_parser().format_help().split())
    resume_help = text[text.index("--resume [PATH]") : text.index("--dry-run run")]
    for flag in [
        "--epochs",
        "--bf16",
        "--compile",
        "--device",
        "--threads",
        "--data-dir",
        "--checkpoint-dir",
        "--quiet",
        "--dry-run",
    ]:
        assert flag in resume_help, flag
    named = {word.strip(",;()") for word in resume_help.split()}
    assert {flag_name(name) for name in RESUMABLE} <= named


@pytest.mark.slow
def test_checkpoint_of_the_previous_layout_still_resumes(data_dir, tmp_path, trained_run):
    """Files written before train_config/batches_done: flags under "args", "step", "partial"."""
    first = train_in_process(data_dir, tmp_path / "old", "--epochs", 1)
    old = {
        key: value
        for key, value in first.items()
        if key not in ("train_config", "batches_done", "totals")
    }
    old["args"] = {
        **first["train_config"],
        "routing_iterations": 3,
        "detach_early_routing": False,
        "resume": None,
        "dry_run": False,
        "quiet": True,
        "device": "auto",
    }
    old["step"], old["partial"] = first["batches_done"], first["totals"]
    torch.save(old, tmp_path / "old" / "last.pt")
    resumed = train_in_process(data_dir, tmp_path / "old", "--epochs", 2, "--resume")
    straight = load_checkpoint(trained_run[0] / "last.pt")  # SMALL_RUN, --epochs 2
    assert_same_state(straight, resumed)


@pytest.mark.parametrize("model", ["capsnet", "cnn"])
def test_bench_prints_its_speeds_as_json(model):
    """bench.py end to end: positive rates; a floor and the model's share of it for CapsNet only.

    More timed steps than the default one-cycle budget of 5 epochs x 1 step, which once crashed it.
    """
    flags = ["--model", model, "--batch-size", 4, "--steps", 3, "--rounds", 2, "--device", "cpu"]
    result = json.loads(run_in_process("bench.py", *flags).stdout)
    assert result["model"] == model and result["batch_size"] == 4
    assert result["train_img_per_s"] > 0 and result["eval_img_per_s"] > 0
    if model == "capsnet":
        assert result["train_ratio"] == pytest.approx(
            result["train_img_per_s"] / result["train_floor_img_per_s"], rel=1e-2
        )
    else:
        assert result["train_floor_img_per_s"] is None and result["train_ratio"] is None


def test_bench_routes_in_the_kernel_or_in_torch_code_as_asked():
    flags = ["--batch-size", 2, "--steps", 1, "--rounds", 1, "--device", "cpu"]
    for routing in ("torch", "kernel"):
        result = json.loads(run_in_process("bench.py", *flags, "--routing", routing).stdout)
        expected = "kernel" if routing == "kernel" and fused_routing.library() else "torch"
        assert result["routing"] == expected
    assert fused_routing.is_enabled()  # bench.py leaves the kernel on for what runs next


@pytest.mark.parametrize("native", [True, False])
def test_bench_warns_before_timing_bf16_where_it_is_emulated(native, monkeypatch):
    """An emulated bf16 round took minutes on Zen 3: bench.py says so before it starts (the
    timing itself is stubbed here, as emulated bf16 is too slow for a test)."""
    monkeypatch.setattr(hardware, "has_native_bf16", lambda device: native)
    timed = []
    monkeypatch.setattr(bench, "measure", lambda args, device: timed.append(args.bf16) or {})
    result = run_in_process("bench.py", "--bf16", "--device", "cpu")
    assert timed == [True] and result.stdout == "{}\n"
    warning = "warning: bf16 is emulated on this cpu (no AVX512-BF16 or AMX)"
    assert (warning in result.stderr) is not native
    assert not run_in_process("bench.py", "--device", "cpu").stderr  # float32: no warning


def test_bench_refuses_bad_flags(tmp_path):
    assert_one_line_error(
        run_in_process("bench.py", "--steps", 0, check=False), "--steps must be between 1 and"
    )
    huge = run_in_process("bench.py", "--batch-size", 10**20, check=False)
    assert_one_line_error(huge, "--batch-size must be between 1 and 100,000")
    (tmp_path / "a-file").write_text("")
    for profile, fragment in ((tmp_path, "is a folder, not a file"),
                              (tmp_path / "a-file" / "p.txt", "--profile's folder")):  # fmt: skip
        result = run_in_process("bench.py", "--profile", profile, check=False)
        assert_one_line_error(result, fragment)  # at once, not after the benchmark
    too_many = run_in_process("bench.py", "--threads", 10**20, check=False)
    assert_one_line_error(too_many, f"--threads must be between 1 and 1024, got {10**20}")
    cnn_on_pairs = run_in_process(
        "bench.py", "--model", "cnn", "--dataset", "multimnist", check=False
    )
    assert_one_line_error(cnn_on_pairs, "--model must be capsnet with --dataset multimnist")


@pytest.mark.slow  # seconds of training: the fast loop stays near a minute
def test_bench_times_a_batch_of_one_pair():
    """One pair needs a pool of two digits of two classes to draw it from."""
    flags = ["--dataset", "multimnist", "--batch-size", 1, "--steps", 1, "--rounds", 1]
    result = json.loads(run_in_process("bench.py", *flags, "--device", "cpu").stdout)
    assert (result["batch_size"], result["image_size"]) == (1, 36)
    assert result["train_img_per_s"] > 0 and result["train_floor_img_per_s"] > 0


def test_train_refuses_zero_threads_before_reading_data(tmp_path):
    result = run_in_process(
        "train.py", "--threads", 0, "--data-dir", tmp_path / "absent", "--dry-run", check=False
    )
    assert_one_line_error(result, "--threads must be between 1 and 1024, got 0")


def test_test_subset_takes_the_first_images_in_order():
    split = Split(torch.arange(5, dtype=torch.uint8).view(5, 1, 1), torch.arange(5))
    assert first_images(split, None) is split
    assert first_images(split, 3).labels.tolist() == [0, 1, 2]
    assert first_images(split, 5).labels.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(UserError, match="--test-subset must be between 1 and 5, got 6"):
        first_images(split, 6)
