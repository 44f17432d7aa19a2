"""The training recipe: learning-rate schedules, the weight average, the run's wall clock, and
the time-to-accuracy report."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import predict
import sweep
import time_to_accuracy
import train
from capslab.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from capslab.data import DATA_DIR
from capslab.errors import UserError
from capslab.hardware import cpu_name, has_native_bf16
from capslab.jsonl import write_jsonl
from capslab.run_plan import build_parser, configs_from_flags
from capslab.training import TrainConfig, build_scheduler, ema_update

from conftest import (
    REPO,
    SMALL_MODEL,
    TINY_RUN,
    StopAfterTwoBatches,
    assert_one_line_error,
    evaluate_json,
    make_trainer,
    run_in_process,
    train_in_process,
)

DEFAULTS = TrainConfig()  # train.py's defaults: one source, the config


def learning_rates(config: TrainConfig, steps_per_epoch: int) -> list[float]:
    """The lr of every step of the budget, stepping the scheduler as training.py does."""
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=config.lr)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    rates = []
    for step in range(config.epochs * steps_per_epoch):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if config.schedule == "onecycle" or (step + 1) % steps_per_epoch == 0:
            scheduler.step()
    return rates


def test_exponential_schedule_decays_once_per_epoch():
    config = TrainConfig(epochs=3, lr=1e-3, lr_decay=0.9, schedule="exponential")
    rates = learning_rates(config, steps_per_epoch=4)
    assert rates == pytest.approx([1e-3] * 4 + [0.9e-3] * 4 + [0.81e-3] * 4)


def test_onecycle_warms_up_for_30_percent_then_anneals_to_about_zero():
    rates = learning_rates(TrainConfig(epochs=4, lr=3e-3, schedule="onecycle"), steps_per_epoch=25)
    assert rates[0] == pytest.approx(3e-3 / 25)  # OneCycleLR's initial lr: max_lr / div_factor
    peak = rates.index(max(rates))
    assert max(rates) == pytest.approx(3e-3) and peak == pytest.approx(0.3 * 99, abs=1)
    assert all(a <= b for a, b in zip(rates[:peak], rates[1 : peak + 1]))  # rising
    assert all(a >= b for a, b in zip(rates[peak:], rates[peak + 1 :]))  # then falling
    assert rates[-1] < 3e-3 / 1000  # about zero at the end of the budget


def test_ema_update_with_warm_up_on_a_toy_model():
    model = torch.nn.Linear(1, 1, bias=False)
    average = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_update(0.9))
    values = [2.0, 4.0, 8.0, 16.0]
    expected = None
    for n, value in enumerate(values):
        with torch.no_grad():
            model.weight.fill_(value)
        average.update_parameters(model)
        if expected is None:  # the first update copies the weights
            expected = value
        else:  # the decay warms up as (1 + n) / (10 + n), capped at 0.9; n updates so far
            decay = min(0.9, (1 + n) / (10 + n))
            expected = decay * expected + (1 - decay) * value
        assert average.module.weight.item() == pytest.approx(expected)


@pytest.mark.slow
def test_training_with_ema_scores_both_and_saves_both(data_dir, tmp_path):
    last = train_in_process(data_dir, tmp_path, "--epochs", 2, "--ema-decay", "0.9")
    for record in last["metrics"]:
        assert {"raw_val_acc", "ema_val_acc", "chosen", "val_acc", "test_acc"} <= record.keys()
        assert record["val_acc"] == record[f"{record['chosen']}_val_acc"]
    assert {"raw_test_acc", "ema_test_acc"} <= last["metrics"][-1].keys()  # both at the end
    assert last["ema"].keys() == last["model"].keys() and last["ema_updates"] == 2 * 3
    assert not torch.equal(last["ema"]["digit_caps.W"], last["model"]["digit_caps.W"])


@pytest.mark.slow
def test_without_validation_the_raw_weights_are_kept_and_both_are_tested(data_dir, tmp_path):
    last = train_in_process(
        data_dir, tmp_path, "--epochs", 1, "--ema-decay", "0.9", run_flags=TINY_RUN
    )
    record = last["metrics"][-1]
    assert last["chosen"] == record["chosen"] == "raw" and "val_acc" not in record
    assert record["test_acc"] == record["raw_test_acc"] and "ema_test_acc" in record
    assert not (tmp_path / "best.pt").exists()


@pytest.mark.slow
def test_evaluate_uses_the_averaged_weights_when_validation_chose_them(data_dir, tmp_path, capsys):
    last = train_in_process(data_dir, tmp_path / "run", "--epochs", 1, "--ema-decay", "0.9")
    chosen = {
        **last,
        "chosen": "ema",
        "model": {k: torch.zeros_like(v) for k, v in last["model"].items()},
    }
    save_checkpoint(chosen, tmp_path / "ema.pt")
    model = model_from_checkpoint(load_checkpoint(tmp_path / "ema.pt"))
    for name, value in model.state_dict().items():
        assert torch.equal(value, last["ema"][name]), name
    scored = evaluate_json(
        capsys, "--checkpoint", tmp_path / "ema.pt", "--data-dir", data_dir, "--test-subset", 100
    )
    assert scored["accuracy"] == pytest.approx(last["metrics"][-1]["ema_test_acc"])


@pytest.mark.slow
def test_wall_clock_continues_across_a_resume(data_dir, tmp_path):
    first = train_in_process(data_dir, tmp_path, "--epochs", 1)
    clock_at_1 = first["metrics"][0]["wall_seconds"]
    assert clock_at_1 >= first["metrics"][0]["seconds"] > 0
    resumed = train_in_process(data_dir, tmp_path, "--epochs", 2, "--resume")
    assert resumed["metrics"][0]["wall_seconds"] == clock_at_1
    assert resumed["metrics"][1]["wall_seconds"] >= clock_at_1 + resumed["metrics"][1]["seconds"]


def test_time_to_accuracy_reports_the_first_epoch_at_each_threshold(tmp_path, capsys):
    records = [
        {"epoch": 1, "test_acc": 99.1, "seconds": 80.0, "wall_seconds": 100.0},
        {"epoch": 2, "test_acc": 99.55, "seconds": 80.0, "wall_seconds": 200.0},
        {"epoch": 3, "test_acc": 99.52, "seconds": 80.0, "wall_seconds": 300.0},
        {"epoch": 4, "test_acc": 99.61, "seconds": 90.0, "wall_seconds": 425.0},
    ]
    for record, machine in zip(records, ["CPU A", "CPU A", "CPU B", "CPU A"]):
        record["machine"] = machine  # resumed elsewhere
    for record, val_acc in zip(records, [99.0, 99.4, 99.4, 99.3]):
        record["val_acc"] = val_acc  # epochs 2 and 3 tie: best.pt keeps the first
    (tmp_path / "run").mkdir()
    write_jsonl(records, tmp_path / "run" / "metrics.jsonl")
    time_to_accuracy.main([str(tmp_path / "run"), "--json"])
    row = json.loads(capsys.readouterr().out)
    assert row["reached"] == {
        "99.0": {"epoch": 1, "seconds": 100.0, "train_seconds": 80.0},
        "99.5": {"epoch": 2, "seconds": 200.0, "train_seconds": 160.0},
        "99.6": {"epoch": 4, "seconds": 425.0, "train_seconds": 330.0},
        "99.7": None,
    }
    assert row["final_test_acc"] == 99.61 and row["machines"] == ["CPU A", "CPU B"]
    assert row["chosen"] == {"epoch": 2, "val_acc": 99.4, "test_acc": 99.55}
    time_to_accuracy.main([str(tmp_path / "run")])
    table = capsys.readouterr().out
    assert "ep 4 7:05" in table and "99.55% ep 2" in table
    assert table.rstrip().endswith("A, CPU B")


def test_time_to_accuracy_marks_a_chosen_epoch_whose_test_was_skipped(tmp_path, capsys):
    """--test-every 2: validation chose epoch 1, which has no test accuracy."""
    records = [
        {"epoch": 1, "val_acc": 99.5, "seconds": 80.0, "wall_seconds": 90.0},
        {"epoch": 2, "val_acc": 99.4, "test_acc": 99.45, "seconds": 80.0, "wall_seconds": 190.0},
    ]
    write_jsonl(records, tmp_path / "metrics.jsonl")
    time_to_accuracy.main([str(tmp_path / "metrics.jsonl"), "--json"])
    row = json.loads(capsys.readouterr().out)
    assert row["chosen"] == {"epoch": 1, "val_acc": 99.5, "test_acc": None}
    assert row["final_test_acc"] == 99.45
    time_to_accuracy.main([str(tmp_path / "metrics.jsonl")])
    assert "untested ep 1" in capsys.readouterr().out


def test_time_to_accuracy_reads_a_checkpoints_log_and_refuses_what_is_no_log(tmp_path, capsys):
    """A log from before the wall clock shows the summed training time, marked "train"."""
    records = [{"epoch": 1, "test_acc": 99.2, "seconds": 470.0}, {"epoch": 2, "test_acc": 99.6,
               "seconds": 475.0}]  # fmt: skip
    save_checkpoint({"model": {}, "config": {}, "metrics": records}, tmp_path / "old.pt")
    time_to_accuracy.main([str(tmp_path / "old.pt")])
    table = capsys.readouterr().out
    assert "ep 1 train 7:50" in table and "ep 2 train 15:45" in table
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x80\x81")
    with pytest.raises(UserError, match="image.png is not a readable metrics log"):
        time_to_accuracy.main([str(tmp_path / "image.png")])


def test_scheduler_steps_with_the_trainer(mnist_train, tmp_path):
    """A onecycle Trainer steps its schedule every batch; an exponential one does not."""
    batch = mnist_train.subset(torch.arange(32))
    for schedule, moved in (("onecycle", True), ("exponential", False)):
        trainer = make_trainer(tmp_path, steps_per_epoch=10, schedule=schedule, epochs=1)
        before = trainer.optimizer.param_groups[0]["lr"]
        trainer.train_step(batch.images, batch.labels, torch.Generator().manual_seed(0))
        assert (trainer.optimizer.param_groups[0]["lr"] != before) == moved


@pytest.mark.slow
def test_sweep_trains_each_run_once_evaluates_it_and_tabulates_the_seeds(
    data_dir, tmp_path, capsys
):
    tiny = ["--train-subset", "64", "--val-size", "32", "--test-subset", "50", "--batch-size", "32"]
    runs = [
        {
            "name": f"tiny-s{seed}",
            "flags": [*tiny, *SMALL_MODEL, "--epochs", "1", "--seed", str(seed)],
        }
        for seed in (0, 1)
    ]
    runs.append({"name": "cnn", "flags": [*tiny, "--epochs", "1", "--model", "cnn"],
                 "evaluate": ["--test-subset", "50"], "paper": "0.39%"})  # fmt: skip
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"evaluate": ["--test-subset", "50", "--affine"], "runs": runs}))
    flags = [str(path), "--data-dir", str(data_dir), "--runs-dir", str(tmp_path / "runs")]
    sweep.main(flags)
    results = [
        json.loads(line) for line in (tmp_path / "grid.results.jsonl").read_text().splitlines()
    ]
    assert [r["name"] for r in results] == ["tiny-s0", "tiny-s1", "cnn"]
    assert results[0]["final"]["epoch"] == 1 and "test_acc" in results[0]["final"]
    assert set(results[0]["evaluation"]["affine"]["accuracy"]) >= {"rotation", "combined"}
    assert "affine" not in results[2]["evaluation"]  # the run's own flags replace the grid's
    assert results[2]["evaluation"]["accuracy"] == pytest.approx(results[2]["final"]["test_acc"])
    before = (tmp_path / "runs" / "tiny-s0" / "last.pt").read_bytes()
    sweep.main(flags)  # everything is done: nothing trains again
    assert (tmp_path / "runs" / "tiny-s0" / "last.pt").read_bytes() == before
    assert len((tmp_path / "grid.results.jsonl").read_text().splitlines()) == 3
    capsys.readouterr()
    sweep.main([str(path), "--table"])
    header, _, tiny_row, cnn_row = capsys.readouterr().out.splitlines()
    assert header.startswith("| run | seeds | paper's test error | val | test | test error |")
    assert "affine, combined" in header
    tests = [r["final"]["test_acc"] for r in results[:2]]
    spread = f"{sum(tests) / 2:.2f} ± {abs(tests[0] - tests[1]) / 2**0.5:.2f}% (2)"
    assert tiny_row.startswith("| tiny | 0, 1 | - | ") and spread in tiny_row
    precision = "bf16" if has_native_bf16(torch.device("cpu")) else "float32"
    assert tiny_row.endswith(f"| {cpu_name()} ({precision}) |")  # trained on
    assert cnn_row.startswith("| cnn | - | 0.39% | ")


def ignore_sigint() -> None:
    """What a non-interactive shell does to a job it starts with `&`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.slow
@pytest.mark.parametrize(
    "signal_number, preexec",
    [(signal.SIGTERM, None), (signal.SIGINT, ignore_sigint)],
    ids=["sigterm", "sigint-inherited-ignored"],
)
def test_a_signal_stops_the_sweep_in_one_line_and_its_run_resumably_never_recorded(
    data_dir, tmp_path, signal_number, preexec
):
    """SIGTERM, or SIGINT even where the sweep was started with SIGINT ignored, reaches its run
    once: the run saves mid-epoch, the sweep says so in one line, and the unfinished run gets
    no results line."""
    flags = ["--train-subset", "6400", "--val-size", "32", "--test-subset", "50", "--epochs", "2"]
    flags += ["--device", "cpu"]  # a GPU could finish both epochs before the signal comes
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([{"name": "long", "flags": [*flags, "--batch-size", "32"]}]))
    command = [sys.executable, str(REPO / "sweep.py"), str(grid), "--data-dir", str(data_dir)]
    sweeping = subprocess.Popen(
        [*command, "--runs-dir", str(tmp_path / "runs")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec,
    )
    try:
        for line in sweeping.stdout:  # the run's first line: it has begun training
            if line.startswith("model capsnet"):
                break
        time.sleep(3)
        sweeping.send_signal(signal_number)
        out, err = sweeping.communicate(timeout=120)
    finally:
        sweeping.kill()
    assert_one_line_error(
        subprocess.CompletedProcess(command, sweeping.returncode, out, err), "interrupted"
    )
    assert "interrupted: saved" in out
    saved = load_checkpoint(tmp_path / "runs" / "long" / "last.pt")
    assert saved["epoch"] == 0 and saved["batches_done"] > 0
    assert not (tmp_path / "grid.results.jsonl").exists()


def test_sweep_counts_a_run_finished_only_at_the_end_of_its_budget(
    data_dir, tmp_path, monkeypatch, trained_run
):
    """train.py exits 0 after a signal stops it and it saves: the checkpoint decides. The
    session's trained_run is the same run (SMALL_RUN, --epochs 2) left to finish."""
    monkeypatch.setattr(train, "StopRequest", StopAfterTwoBatches)
    train_in_process(data_dir, tmp_path / "stopped", "--epochs", 2)
    monkeypatch.undo()
    whole, _ = trained_run
    assert not sweep.finished(tmp_path / "stopped") and sweep.finished(whole)


def test_training_without_reconstruction_leaves_the_decoder_as_initialised(mnist_train, tmp_path):
    """--reconstruction-weight 0: the step's loss is the margin loss alone, the decoder gets no
    gradient and keeps its initial weights, everything else learns."""
    batch = mnist_train.subset(torch.arange(32))
    trainer = make_trainer(tmp_path, reconstruction_weight=0.0)
    before = {name: p.clone() for name, p in trainer.model.named_parameters()}
    trainer.model.decoder.register_forward_hook(lambda *_: pytest.fail("the decoder ran"))
    trainer.train_step(batch.images, batch.labels, torch.Generator().manual_seed(0))
    for name, parameter in trainer.model.named_parameters():
        changed = not torch.equal(parameter, before[name])
        assert changed == (not name.startswith("decoder.")), name
        assert (parameter.grad is None) == name.startswith("decoder."), name


def test_a_run_without_reconstruction_is_saved_as_such_and_shows_no_reconstructions(
    data_dir, tmp_path, capsys
):
    folder = tmp_path / "margin-only"
    checkpoint = train_in_process(
        data_dir, folder, "--epochs", 1, "--reconstruction-weight", 0, run_flags=TINY_RUN
    )
    assert checkpoint["train_config"]["reconstruction_weight"] == 0
    result = evaluate_json(
        capsys, "--checkpoint", folder / "last.pt", "--data-dir", data_dir, "--test-subset", 40,
        "--figures", tmp_path / "figures",
    )  # fmt: skip
    assert [Path(path).name for path in result["figures"]] == [
        "confusion_matrix.png",
        "misclassified.png",
    ]
    with pytest.raises(UserError, match="--show: .* trained without the reconstruction loss"):
        predict.main([str(tmp_path / "digit.png"), "--checkpoint", str(folder / "last.pt"),
                      "--show", str(tmp_path / "show")])  # fmt: skip
    with pytest.raises(UserError, match="--reconstruction-weight cannot change when resuming"):
        train_in_process(
            data_dir,
            folder,
            *["--resume", "--epochs", 2, "--reconstruction-weight", 0.0005],
            run_flags=TINY_RUN,
        )


def test_settings_saved_before_a_setting_existed_resume_as_they_ran():
    """A run saved before --schedule, --ema-decay, --adam-betas, --reconstruction-weight and
    --bf16 existed ran exponential decay without averaging: it must not pick up today's
    defaults (onecycle, averaging) on resume."""
    saved = {"epochs": 30, "batch_size": 128, "lr": 0.001, "lr_decay": 0.9, "seed": 0}
    config = TrainConfig.from_dict({**saved, "data_dir": "data", "quiet": True})
    assert (config.schedule, config.ema_decay, config.bf16) == ("exponential", None, False)
    assert config.adam_betas == (0.9, 0.999) and config.reconstruction_weight == 0.0005
    assert (config.epochs, config.batch_size, config.lr) == (30, 128, 0.001)
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()  # today's round trip


RECIPE = ("batch_size", "lr", "schedule", "lr_decay", "adam_betas", "ema_decay", "max_shift")


def grid_configs(grid: str) -> dict[str, TrainConfig]:
    """Each run's TrainConfig, built from its flags as train.py builds it."""
    runs = sweep.read_grid(REPO / "results" / "grids" / grid, DATA_DIR)
    parse = build_parser().parse_args  # exits on a flag train.py lacks
    return {run["name"]: configs_from_flags(parse(run["flags"]))[0] for run in runs}


@pytest.mark.parametrize("grid", ["table1.json", "long.json", "final.json"])
def test_grids_that_pin_the_default_recipe_pin_train_pys_defaults(grid):
    prefixes = ("capsnet-", "paper-cnn-", "default-")
    pinned = {name: c for name, c in grid_configs(grid).items() if name.startswith(prefixes)}
    assert pinned, grid
    for name, config in pinned.items():
        for setting in RECIPE:
            assert getattr(config, setting) == getattr(DEFAULTS, setting), (name, setting)


def test_the_recipe_grid_names_every_setting_its_arms_compare():
    """Its records stay true when a default changes: no arm leans on train.py's defaults."""
    for run in sweep.read_grid(REPO / "results" / "grids" / "recipe.json", DATA_DIR):
        assert {"--schedule", "--lr", "--batch-size", "--ema-decay"} <= set(run["flags"]), run


def test_table1_trains_every_row_for_the_default_epoch_budget():
    budgets = {config.epochs for config in grid_configs("table1.json").values()}
    assert budgets == {DEFAULTS.epochs}


def test_every_committed_grid_parses_with_train_pys_flags():
    for grid in sorted((REPO / "results" / "grids").glob("*.json")):
        assert grid_configs(grid.name), grid


def test_the_plot_shows_each_recipes_seeds_beside_the_papers_figure(tmp_path, capsys):
    def result(name: str, test_acc: float, **extra) -> str:
        return json.dumps({"name": name, "final": {"test_acc": test_acc}, **extra})

    grid = tmp_path / "grid.json"
    grid.with_suffix(".results.jsonl").write_text(
        "\n".join(
            [
                result("caps-s0", 99.70, paper="0.25 ± 0.005%"),
                result("cnn-s0", 99.50, paper="0.39%"),
                result("caps-s1", 99.60, paper="0.25 ± 0.005%"),
            ]
        )
    )
    errors = sweep.errors_by_recipe(grid.with_suffix(".results.jsonl"))
    assert list(errors) == ["caps", "cnn"]  # seeds grouped, first-finished order kept
    assert errors["caps"][0] == pytest.approx([0.30, 0.40])
    assert errors["caps"][1] == (0.25, 0.005) and errors["cnn"][1] == (0.39, None)
    sweep.main([str(grid), "--plot", str(tmp_path / "errors.png")])
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'errors.png'}"
    assert (tmp_path / "errors.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("figure", ["about 0.3", "0.25 +- 0.1%", "", "1.2.3%", ".%", "0.3 ± .%"])
def test_a_paper_figure_that_is_not_an_error_is_named(figure):
    with pytest.raises(UserError, match="the paper's figure"):
        sweep.paper_error(figure)


def test_plot_into_a_folder_that_cannot_be_made_is_one_line(tmp_path):
    grid = tmp_path / "grid.json"
    grid.with_suffix(".results.jsonl").write_text('{"name": "a-s0", "final": {"test_acc": 99.4}}\n')
    (tmp_path / "a-file").write_text("")
    result = run_in_process("sweep.py", grid, "--plot", tmp_path / "a-file" / "e.png", check=False)
    assert_one_line_error(result, f"--plot's folder {tmp_path / 'a-file'} is a file")
    result = run_in_process("sweep.py", grid, "--plot", tmp_path, check=False)
    assert_one_line_error(result, f"--plot {tmp_path} is a folder: name the PNG to write")
    result = run_in_process("sweep.py", grid, "--plot", tmp_path / "e.svg", check=False)
    assert_one_line_error(result, "e.svg: the plot is a PNG, so name a .png file")
    assert not (tmp_path / "e.svg").exists()
    sweep.main([str(grid), "--plot", str(tmp_path / "new" / "e.png")])  # a new folder is made
    assert (tmp_path / "new" / "e.png").read_bytes().startswith(b"\x89PNG")


def test_plotting_or_tabling_a_grid_with_no_finished_run_is_one_line(tmp_path):
    grid = tmp_path / "grid.json"
    grid.write_text("[]")
    result = run_in_process("sweep.py", grid, "--plot", tmp_path / "a.png", check=False)
    assert_one_line_error(result, "no run of", "has finished yet")
    assert not (tmp_path / "a.png").exists()
    result = run_in_process("sweep.py", grid, "--table", check=False)
    assert_one_line_error(result, "no run of", "has finished yet")


def test_a_torn_results_line_is_named_in_one_line_and_a_blank_one_skipped(tmp_path):
    grid = tmp_path / "grid.json"
    results = grid.with_suffix(".results.jsonl")
    results.write_text(json.dumps({"name": "a-s0", "final": {"test_acc": 99.5}}) + "\n\n")
    assert list(sweep.latest_results(results)) == ["a-s0"]
    results.write_text(results.read_text() + '{"name": "a-s1", "fin\n')
    result = run_in_process("sweep.py", grid, "--table", check=False)
    assert_one_line_error(result, f"{results} is not a readable results file (line 3:")


def test_compare_sets_two_groups_of_recipes_against_each_other(tmp_path, capsys):
    grid = tmp_path / "grid.json"
    accuracies = {"r3-a-s0": 99.9, "r3-a-s1": 99.8, "r3-b-s0": 99.7, "r1-a-s0": 99.6}
    accuracies |= {"r1-a-s1": 99.5, "r1-b-s0": 99.4}
    affine = {"r3-a-s0": 80.0, "r3-a-s1": 81.0, "r1-a-s0": 79.0, "r1-a-s1": 79.0}

    def result(name: str) -> str:
        scores = {"affine": {"accuracy": {"combined": affine[name]}}} if name in affine else {}
        return json.dumps(
            {"name": name, "final": {"test_acc": accuracies[name]}, "evaluation": scores}
        )

    grid.with_suffix(".results.jsonl").write_text("\n".join(map(result, accuracies)))
    sweep.main([str(grid), "--compare", "r3-*", "r1-*"])
    # Errors 0.1, 0.2, 0.3 against 0.4, 0.5, 0.6: of the 20 splits of six runs into three and
    # three, only the observed one and its mirror differ by 0.3 points.
    assert capsys.readouterr().out.strip() == (
        "r3-* (3 runs) minus r1-* (3 runs): test error -0.300, standard error 0.082; "
        "exact permutation test p = 0.10 over 20 splits"
    )
    assert sweep.permutation_test([0.1, 0.2], [0.2, 0.1]) == (1.0, 6)
    sweep.main([str(grid), "--compare", "r3-*", "r1-*", "--column", "affine, combined"])
    # Runs without an affine score are left out: 80 and 81 against 79 and 79.
    assert capsys.readouterr().out.strip() == (
        "r3-* (2 runs) minus r1-* (2 runs): affine, combined +1.500, standard error 0.500; "
        "exact permutation test p = 0.33 over 6 splits"
    )
    with pytest.raises(UserError, match="'r3-b' matches 1 finished run"):
        sweep.main([str(grid), "--compare", "r3-b", "r1-*"])
    with pytest.raises(UserError, match="r3-a matches both 'r3-\\*' and '\\*-a'"):
        sweep.main([str(grid), "--compare", "r3-*", "*-a"])


def test_the_table_shows_the_routing_statistics_of_each_recipe(tmp_path):
    def result(seed: int, entropy: float, spread: float) -> str:
        routing = {"coupling_entropy": entropy, "coupling_std": spread}
        routing["accuracy_by_iterations"] = {"1": 99.5, "3": 99.6}
        final = {"test_acc": 99.7, "val_acc": 99.6}
        log = [{"epoch": 1, "machine": "CPU A", "bf16": False}]
        record = {"name": f"r3-s{seed}", "final": final, "log": log}
        return json.dumps({**record, "evaluation": {"routing": routing}})

    results = tmp_path / "grid.results.jsonl"
    results.write_text(result(0, 2.3000, 0.0030) + "\n" + result(1, 2.3010, 0.0040))
    header, _, row = sweep.table_rows(results)
    cells = dict(zip(header.strip("| ").split(" | "), row.strip("| ").split(" | ")))
    assert cells["coupling entropy (nats)"] == "2.3005 ± 0.0007 (2)"
    assert cells["std of c_ij across inputs"] == "0.0035 ± 0.0007 (2)"
    assert cells["test at r=1"] == "99.50 ± 0.00% (2)"
    assert cells["test at r=3"] == "99.60 ± 0.00% (2)"
    assert "test error" not in cells  # no paper's figure to set it beside
    assert cells["trained on"] == "CPU A (float32)"


def test_the_table_can_show_chosen_columns_one_row_per_run(tmp_path, capsys):
    def result(name: str, combined: float, translation: float) -> str:
        affine = {"accuracy": {"combined": combined, "translation": translation}}
        final = {"test_acc": 99.5, "val_acc": 99.4}
        return json.dumps(
            {"name": name, "final": final, "log": [], "evaluation": {"affine": affine}}
        )

    grid = tmp_path / "grid.json"
    lines = [result("r3-s0", 79.0, 84.0), result("r3-s1", 80.0, 85.0), result("cnn-s0", 77.0, 82.0)]
    grid.with_suffix(".results.jsonl").write_text("\n".join(lines))
    sweep.main([str(grid), "--table", "--per-run", "--columns", "affine, translation", "test"])
    assert capsys.readouterr().out.splitlines() == [
        "| run | seeds | affine, translation | test | trained on |",
        "|---|---|---|---|---|",
        "| r3-s0 | 0 | 84.00% | 99.50% | - |",
        "| r3-s1 | 1 | 85.00% | 99.50% | - |",
        "| cnn-s0 | 0 | 82.00% | 99.50% | - |",
    ]
    sweep.main([str(grid), "--table", "--columns", "affine, translation", "affine, rotation"])
    header, _, r3_row, _ = capsys.readouterr().out.splitlines()
    assert header == "| run | seeds | affine, translation | trained on |"  # rotation: unmeasured
    assert r3_row == "| r3 | 0, 1 | 84.50 ± 0.71% (2) | - |"
    with pytest.raises(SystemExit) as exit_info:  # alone, --columns would start the sweep
        sweep.main([str(grid), "--columns", "test"])
    assert exit_info.value.code == 2
    assert "add --table" in capsys.readouterr().err
