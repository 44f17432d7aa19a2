"""The research tools around train.py (sweep.py, time_to_accuracy.py, export.py) refuse bad
input in one line, name the file and line at fault, and lose or misplace nothing."""

import json
import math
import subprocess
import sys

import pytest

import export
import sweep
import time_to_accuracy
import train
from capslab.checkpoint import load_checkpoint, save_checkpoint, unvalidated_weights
from capslab.data import DATA_DIR
from capslab.errors import UserError
from capslab.jsonl import chosen_by_validation, write_jsonl

from conftest import (
    REPO,
    TINY_RUN,
    StopAfterTwoBatches,
    assert_one_line_error,
    run,
    run_in_process,
    train_in_process,
)

# A real run that train.py refuses once it has read the data: a batch larger than the subset.
REFUSED = ["--train-subset", "64", "--batch-size", "100", "--val-size", "0", "--test-subset", "40"]


def files_under(folder) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


# --- sweep.py: the grid --------------------------------------------------------------------


def test_a_bad_grid_is_refused_whole_in_one_line_before_any_run_trains(tmp_path):
    runs = [
        {"name": "good", "flags": ["--epochs", "1"]},
        {"name": 7, "flags": []},
        {"name": "twin", "flags": []},
        {"name": "Twin", "flags": []},
        {"name": "../outside", "flags": []},
        {"name": "typo", "flags": ["--epocks", "1"]},
        {"name": "zero", "flags": ["--epochs", "0"]},
        {"name": "own", "flags": ["--checkpoint-dir", str(tmp_path / "elsewhere")]},
        {"name": "words", "flags": "--epochs 1"},
    ]
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps(runs))
    before = files_under(tmp_path)
    result = run_in_process("sweep.py", grid, "--runs-dir", tmp_path / "runs", check=False)
    assert_one_line_error(
        result,
        f"{grid} has 7 problem(s); no run of it trains until they are fixed: ",
        "run 2: its name is a number, not a string",
        "run 4 ('Twin'): run 3 has the same name",
        "run 5 ('../outside'): its name has a path separator",
        "run 6 ('typo'): 'flags': unrecognized arguments: --epocks 1",
        "run 7 ('zero'): 'flags': --epochs must be",
        "run 8 ('own'): 'flags': --checkpoint-dir: the sweep sets these itself",
        "run 9 ('words'): 'flags' must be a list of strings",
    )
    assert files_under(tmp_path) == before  # no run folder, no results file, nothing outside


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"{not json", "is not a readable grid file (Expecting property name"),
        (b"\xff\xfe", "is not a readable grid file ('utf-8' codec"),
        (b'"runs"', "must hold a JSON list of"),
        (b'{"runs": 5}', "must hold a JSON list of"),
        (b"[]", "it holds no run"),
        (b'{"runs": []}', "it holds no run"),
        (b'{"runs": [{"name": "a", "flags": []}], "extra": 1}', "unknown key 'extra'"),
        (b"[5]", "run 1 is a number, not an object"),
        (b'[{"name": "a"}]', "run 1 ('a'): no 'flags'"),
        (b'[{"name": "a", "flags": [], "colour": 1}]', "run 1 ('a'): unknown key 'colour'"),
        (b'[{"name": "a", "flags": [], "paper": 0.3}]', "'paper' must be a string"),
        (b'[{"name": "a", "flags": [], "paper": "1.2.3%"}]', "the paper's figure '1.2.3%'"),
        (b'[{"name": "a", "flags": [], "evaluate": ["--json"]}]', "--json: the sweep sets"),
        (b'[{"name": "a", "flags": [], "evaluate": ["--checkpoint", "x"]}]', "--checkpoint: the"),
        (b'[{"name": "a", "flags": [], "evaluate": ["--check=x"]}]', "--checkpoint: the sweep"),
        (b'{"evaluate": ["--data-dir=d"], "runs": [{"name": "a", "flags": []}]}', "--data-dir"),
        (b'[{"name": "a", "flags": [], "evaluate": ["--figures", "f"]}]', "--figures would write"),
        (b'{"evaluate": ["--afine"], "runs": [{"name": "a", "flags": []}]}', "--afine"),
        (b'[{"name": "a", "flags": [], "evaluate": ["--seed", "-1"]}]', "--seed must be in 0"),
        (b'[{"name": "a", "flags": [], "evaluate": ["--help"]}]', "the flags ask for help"),
    ],
)
def test_a_grid_file_that_is_no_grid_is_refused_in_one_line(tmp_path, content, fragment):
    grid = tmp_path / "grid.json"
    grid.write_bytes(content)
    result = run_in_process("sweep.py", grid, "--runs-dir", tmp_path / "runs", check=False)
    assert_one_line_error(result, str(grid), fragment)
    assert not (tmp_path / "runs").exists()


def test_a_grid_that_is_missing_or_a_folder_is_refused_in_one_line(tmp_path):
    for path in (tmp_path / "missing.json", tmp_path):
        result = run_in_process("sweep.py", path, check=False)
        assert_one_line_error(result, f"{path} is not a readable grid file")


@pytest.mark.slow
def test_a_grid_in_a_folder_that_takes_no_files_is_refused_before_any_run(tmp_path):
    grid = tmp_path / "locked" / "grid.json"
    grid.parent.mkdir()
    grid.write_text(json.dumps([{"name": "a", "flags": []}]))
    grid.parent.chmod(0o555)
    result = run("sweep.py", grid, "--runs-dir", tmp_path / "runs", check=False, as_a_user=True)
    assert_one_line_error(result, f"the grid's folder {grid.parent} cannot be written")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", ".hidden", "a/b", "a\\b", " padded", "tab\tname", None, ["a"], "x" * 201],
)
def test_a_run_name_that_names_no_folder_of_its_own_is_refused(name):
    assert sweep.name_problem(name)


# --- sweep.py: failed runs -----------------------------------------------------------------


class FakeRuns:
    """Stands in for train.py: the named runs fail (exit 1, two lines of output), the others
    finish with one logged epoch; it counts who trained."""

    def __init__(self, monkeypatch, failing: set[str]):
        self.failing, self.trained, self.finished = failing, [], set()
        monkeypatch.setattr(sweep, "train", self.train)
        monkeypatch.setattr(sweep, "complete", lambda folder: folder.name in self.finished)
        monkeypatch.setattr(sweep, "records", lambda folder: [{"epoch": 1, "test_acc": 99.0}])

    def train(self, run, folder, data_dir):
        self.trained.append(run["name"])
        if run["name"] in self.failing:
            return 1, ["epoch 1/1 ...", "error: something the run cannot get past"]
        self.finished.add(folder.name)
        return 0, []


def test_a_run_trained_before_the_sweep_stopped_is_evaluated_not_trained_again(
    tmp_path, monkeypatch, capsys
):
    """kill -9 of the sweep between a run's last epoch and its results line: the rerun
    records it (train.py --resume would refuse a finished run: nothing to resume)."""
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([{"name": n, "flags": []} for n in ("a", "b")]))
    fake = FakeRuns(monkeypatch, failing=set())
    fake.finished.add("a")
    sweep.main([str(grid), "--runs-dir", str(tmp_path / "runs")])
    assert fake.trained == ["b"] and "[a] trained already: evaluating it" in capsys.readouterr().out
    lines = grid.with_suffix(".results.jsonl").read_text().splitlines()
    assert [json.loads(line)["name"] for line in lines] == ["a", "b"]


def test_a_failed_run_is_recorded_the_next_runs_go_on_and_the_sweep_fails_at_the_end(
    tmp_path, monkeypatch
):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([{"name": n, "flags": []} for n in ("a", "bad", "c")]))
    results = grid.with_suffix(".results.jsonl")
    flags = [str(grid), "--runs-dir", str(tmp_path / "runs")]
    fake = FakeRuns(monkeypatch, failing={"bad"})
    with pytest.raises(UserError, match=r"1 run\(s\) failed: bad \(train.py exit 1\).*--retry-f"):
        sweep.main(flags)
    assert fake.trained == ["a", "bad", "c"]
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert [line["name"] for line in lines] == ["a", "bad", "c"]
    assert lines[1]["failed"] == {
        "script": "train.py",
        "exit_status": 1,
        "log_tail": ["epoch 1/1 ...", "error: something the run cannot get past"],
    }
    assert "failed" not in lines[0] and lines[0]["final"] == {"epoch": 1, "test_acc": 99.0}

    fake.trained.clear()  # again, as it was: nothing trains, and it still fails
    with pytest.raises(UserError, match="1 run"):
        sweep.main(flags)
    assert fake.trained == []

    fake.failing.clear()  # the cause is fixed: --retry-failed retries it alone
    sweep.main([*flags, "--retry-failed"])
    assert fake.trained == ["bad"]
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert [line["name"] for line in lines] == ["a", "c", "bad"]  # its failure replaced
    assert not any("failed" in line for line in lines)


def test_a_run_that_fails_again_on_retry_is_tried_once_per_sweep(tmp_path, monkeypatch):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([{"name": "bad", "flags": []}]))
    fake = FakeRuns(monkeypatch, failing={"bad"})
    flags = [str(grid), "--runs-dir", str(tmp_path / "runs")]
    for _ in range(2):
        with pytest.raises(UserError, match="bad"):
            sweep.main([*flags, "--retry-failed"])
    assert fake.trained == ["bad", "bad"]


def test_failed_runs_stay_out_of_the_table_and_the_comparison(tmp_path, capsys):
    grid = tmp_path / "grid.json"
    finished = [
        {"name": f"{arm}-s{seed}", "final": {"test_acc": 99.0 + seed / 10}}
        for arm in "rq"
        for seed in (0, 1)
    ]
    failed = {"name": "r-s2", "flags": [], "failed": {"script": "train.py", "exit_status": 1}}
    write_jsonl([*finished, failed], grid.with_suffix(".results.jsonl"))
    sweep.main([str(grid), "--table"])
    assert "| r | 0, 1 | " in capsys.readouterr().out
    sweep.main([str(grid), "--compare", "r", "q"])
    assert "r (2 runs) minus q (2 runs)" in capsys.readouterr().out


def test_list_prints_each_runs_state_and_trains_nothing(tmp_path, monkeypatch, capsys):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([{"name": n, "flags": []} for n in ("a", "bad")]))
    flags = [str(grid), "--runs-dir", str(tmp_path / "runs")]
    fake = FakeRuns(monkeypatch, failing={"bad"})
    with pytest.raises(UserError):
        sweep.main(flags)  # a finishes, bad fails
    grid.write_text(json.dumps([{"name": n, "flags": []} for n in ("a", "bad", "new")]))
    capsys.readouterr()
    monkeypatch.setattr(
        sweep, "records", lambda folder: [{"epoch": 1}] if folder.name == "bad" else []
    )
    sweep.main([*flags, "--list"])
    assert fake.trained == ["a", "bad"]  # by the first sweep; --list trains nothing
    assert capsys.readouterr().out.splitlines() == [
        "[a] done",
        "[bad] failed (train.py exit 1), 1 epoch logged",
        "[new] to do",
    ]


def test_a_run_that_exits_0_before_its_budget_ends_stops_the_sweep_unrecorded(
    tmp_path, monkeypatch
):
    """train.py exits 0 when a signal sent to it alone stopped it: the sweep stops, saying so."""
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([{"name": "cut", "flags": []}, {"name": "next", "flags": []}]))
    fake = FakeRuns(monkeypatch, failing=set())
    monkeypatch.setattr(sweep, "complete", lambda folder: False)
    with pytest.raises(UserError, match="run cut ended .exit 0. before the end of its budget"):
        sweep.main([str(grid), "--runs-dir", str(tmp_path / "runs")])
    assert fake.trained == ["cut"] and not grid.with_suffix(".results.jsonl").exists()


@pytest.mark.parametrize("code, shown", [(1, "exit 1"), (2, "exit 2"), (-9, "killed by signal 9")])
def test_an_exit_status_reads_as_a_code_or_a_signal(code, shown):
    assert sweep.exit_status(code) == shown


@pytest.mark.slow
def test_a_real_sweep_records_a_refused_run_and_trains_the_next(data_dir, tmp_path):
    """End to end: train.py refuses the first run's batch size, the second run trains."""
    grid = tmp_path / "grid.json"
    tiny = [*TINY_RUN, "--epochs", "1", "--device", "cpu"]
    grid.write_text(
        json.dumps([{"name": "refused", "flags": REFUSED}, {"name": "tiny", "flags": tiny}])
    )
    runs = tmp_path / "runs"
    result = run("sweep.py", grid, "--data-dir", data_dir, "--runs-dir", runs, check=False)
    assert_one_line_error(result, "1 run(s) failed: refused (train.py exit 2)", "--retry-failed")
    lines = [
        json.loads(line)
        for line in grid.with_suffix(".results.jsonl").read_text().split("\n")
        if line
    ]
    assert [line["name"] for line in lines] == ["refused", "tiny"]
    assert lines[0]["failed"]["exit_status"] == 2
    assert "larger than the 64 training images" in lines[0]["failed"]["log_tail"][-1]
    assert lines[1]["final"]["epoch"] == 1 and "test_acc" in lines[1]["final"]
    assert "larger than the 64" in result.stdout  # the run's own message, echoed
    assert {path.name for path in runs.iterdir()} <= {"refused", "tiny"}
    assert (runs / "tiny" / "last.pt").is_file()


# --- sweep.py: the results file ------------------------------------------------------------


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"final": {"test_acc": 99.5}}', "line 2: no run 'name'"),
        ('["r-s1", 99.5]', 'line 2: ["r-s1", 99.5] is a list, not a JSON object'),
        ('{"name": "r-s1"}', "line 2: run r-s1 has no 'final' epoch record"),
        ('{"name": "r-s1", "final": {"test_acc": "99.5"}}', 'final.test_acc is "99.5", not a'),
        ('{"name": "r-s1", "final": {"test_acc": NaN}}', "final.test_acc is NaN, not a finite"),
        ('{"name": "r-s1", "final": {"wall_seconds": -Infinity}}', "is -Infinity, not a finite"),
        ('{"name": "r-s1", "final": {}, "log": [1]}', "'log' is not a list of epoch records"),
    ],
)
def test_a_bad_results_line_is_named_by_file_and_line(tmp_path, line, problem):
    grid = tmp_path / "grid.json"
    results = grid.with_suffix(".results.jsonl")
    results.write_text(json.dumps({"name": "r-s0", "final": {"test_acc": 99.4}}) + "\n" + line)
    with pytest.raises(UserError) as error:
        sweep.main([str(grid), "--table"])
    assert str(error.value).startswith(f"{results} is not a readable results file (")
    assert problem in str(error.value)


def test_a_bad_results_line_stops_compare_in_one_line(tmp_path):
    grid = tmp_path / "grid.json"
    results = grid.with_suffix(".results.jsonl")
    results.write_text('{"name": "a-s0", "final": {"test_acc": 99.4}}\n{"name": "a-s1"}\n')
    before = results.read_bytes()
    result = run_in_process("sweep.py", grid, "--compare", "a-*", "b-*", check=False)
    assert_one_line_error(result, f"{results} is not a readable results file (line 2:")
    assert results.read_bytes() == before


def test_compare_with_many_runs_a_side_draws_a_seeded_monte_carlo_sample(tmp_path, capsys):
    grid = tmp_path / "grid.json"
    lines = [
        {"name": f"{arm}-s{seed}", "final": {"test_acc": 99.5 + shift + seed / 100}}
        for arm, shift in (("r3", 0.05), ("r1", 0.0))
        for seed in range(18)
    ]
    write_jsonl(lines, grid.with_suffix(".results.jsonl"))
    sweep.main([str(grid), "--compare", "r3", "r1"])
    first = capsys.readouterr().out.strip()
    assert first.startswith("r3 (18 runs) minus r1 (18 runs): test error -0.050")
    assert "Monte-Carlo permutation test p = " in first
    assert f"over {sweep.PERMUTATIONS} random splits (seed {sweep.PERMUTATION_SEED})" in first
    sweep.main([str(grid), "--compare", "r3", "r1"])
    assert capsys.readouterr().out.strip() == first  # seeded: the same p every time
    p_value = float(first.split("p = ")[1].split()[0])
    assert 0 < p_value < 0.05  # 18 against 18, shifted by 0.05 with a spread of 0.05


def test_the_monte_carlo_test_agrees_with_the_exact_one():
    first, second = [0.1, 0.2, 0.3, 0.35], [0.4, 0.5, 0.6, 0.45]
    exact, _ = sweep.permutation_test(first, second)
    assert sweep.sampled_permutation_test(first, second, draws=20_000) == pytest.approx(
        exact, abs=0.01
    )


# --- time_to_accuracy.py -------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"test_acc": 99.1}', "line 2: the record has no 'epoch'"),
        ("99.1", "line 2: 99.1 is a number, not a JSON object"),
        ('{"epoch": 2, "test_acc": "99.1"}', "line 2: 'test_acc' is \"99.1\", not a number"),
        ('{"epoch": "2", "test_acc": 99.1}', "line 2: 'epoch' is \"2\", not a number"),
    ],
)
def test_time_to_accuracy_names_the_log_and_line_of_a_bad_record(tmp_path, line, problem):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"epoch": 1, "test_acc": 99.0}\n' + line + "\n")
    with pytest.raises(UserError) as error:
        time_to_accuracy.main([str(log)])
    assert str(error.value).startswith(f"{log} is not a readable metrics log (")
    assert problem in str(error.value)


def test_time_to_accuracy_stops_at_a_bad_record_in_one_line_and_exit_status_2(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"epoch": 1, "test_acc": 99.0}\n99.5\n')
    result = run_in_process("time_to_accuracy.py", log, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert_one_line_error(result, f"{log} is not a readable metrics log (line 2: 99.5 is a")


def test_time_to_accuracy_names_a_bad_record_in_a_checkpoints_log(tmp_path, tiny_checkpoint):
    checkpoint = load_checkpoint(tiny_checkpoint)
    path = tmp_path / "bad.pt"
    save_checkpoint({**checkpoint, "metrics": [{"test_acc": 99.0}]}, path)
    with pytest.raises(UserError, match="epoch record 1: the record has no 'epoch'"):
        time_to_accuracy.main([str(path)])


def test_time_to_accuracy_refuses_a_missing_log_a_bad_machine_and_metrics_that_are_no_list(
    tmp_path,
):
    (tmp_path / "machine.jsonl").write_text('{"epoch": 1, "test_acc": 99.0, "machine": 5}\n')
    save_checkpoint({"model": {}, "config": {}, "metrics": "abc"}, tmp_path / "flat.pt")
    cases = [
        (tmp_path / "missing.jsonl", "missing.jsonl is not a readable metrics log"),
        (tmp_path, "metrics.jsonl is not a readable metrics log"),  # a folder without a log
        (tmp_path / "machine.jsonl", "line 1: 'machine' is 5, not a string"),
        (
            tmp_path / "flat.pt",
            "flat.pt holds an invalid log (its 'metrics' are not a list of records)",
        ),
    ]
    for path, fragment in cases:
        assert_one_line_error(run_in_process("time_to_accuracy.py", path, check=False), fragment)


def test_time_to_accuracy_heads_each_column_with_its_threshold_as_given(tmp_path, capsys):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"epoch": 1, "test_acc": 99.2}\n{"epoch": 2, "test_acc": 99.6}\n')
    time_to_accuracy.main([str(log), "--thresholds", "99.15", "99.25", "99"])
    header, row = capsys.readouterr().out.splitlines()
    assert header.split()[1:4] == ["99.15%", "99.25%", "99.0%"]
    assert row.split()[1:10] == ["ep", "1", "train", "0:00", "ep", "2", "train", "0:00", "ep"]


def test_time_to_accuracy_writes_null_where_the_log_holds_nan(tmp_path, capsys):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"epoch": 1, "test_acc": 99.2, "val_acc": NaN, "wall_seconds": NaN}\n')
    time_to_accuracy.main([str(log), "--json", "--thresholds", "99.0"])
    out = capsys.readouterr().out
    row = json.loads(out, parse_constant=lambda name: pytest.fail(f"bare {name} in {out}"))
    assert row["reached"]["99.0"] == {"epoch": 1, "seconds": None, "train_seconds": 0}
    assert row["chosen"] is None  # a NaN validation score chooses nothing, as in training
    time_to_accuracy.main([str(log), "--thresholds", "99.0"])
    assert "ep 1 train 0:00" in capsys.readouterr().out  # the clock is NaN: training time


def test_validation_never_chooses_an_epoch_scored_nan():
    records = [{"epoch": 1, "val_acc": math.nan}, {"epoch": 2, "val_acc": 99.0}]
    assert chosen_by_validation(records)["epoch"] == 2


@pytest.mark.parametrize("threshold", ["nan", "inf", "-1", "101"])
def test_time_to_accuracy_refuses_a_threshold_that_is_no_accuracy(tmp_path, threshold, capsys):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"epoch": 1, "test_acc": 99.2}\n')
    with pytest.raises(UserError, match=f"--thresholds {float(threshold)} is not a test accuracy"):
        time_to_accuracy.main([str(log), "--thresholds", "99.0", threshold])
    assert capsys.readouterr().out == ""


def test_nan_becomes_none_all_the_way_down():
    row = {"a": math.nan, "b": [1.0, math.inf], "c": {"d": -math.inf, "e": "x"}}
    assert time_to_accuracy.without_nan(row) == {
        "a": None,
        "b": [1.0, None],
        "c": {"d": None, "e": "x"},
    }


# --- export.py -----------------------------------------------------------------------------


def test_export_refuses_a_run_stopped_before_its_first_epoch_ended(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "StopRequest", StopAfterTwoBatches)
    folder = tmp_path / "stopped"
    stopped = train_in_process(data_dir, folder, "--epochs", 1, run_flags=TINY_RUN)
    assert stopped["epoch"] == 0 and stopped["metrics"] == []
    out = tmp_path / "out.pt"
    result = run_in_process("export.py", folder / "last.pt", out, check=False)
    assert_one_line_error(
        result, "holds weights saved before any epoch ended (epoch 0, no metrics", "--unvalidated"
    )
    assert not out.exists()
    export.main([str(folder / "last.pt"), str(out), "--unvalidated"])
    assert load_checkpoint(out)["epoch"] == 0
    # evaluate.py scores such a file, saying first on stderr what it holds.
    scored = run_in_process(
        "evaluate.py", "--checkpoint", out, "--data-dir", data_dir, "--test-subset", 40, "--json"
    )
    assert "note:" in scored.stderr and "nothing has scored them" in scored.stderr
    assert json.loads(scored.stdout)["total"] == 40


def test_export_names_what_an_unvalidated_file_holds():
    scored = {"epoch": 3, "metrics": [{"epoch": 3, "val_acc": 99.1}], "batches_done": 0}
    assert unvalidated_weights(scored) is None
    midway = {**scored, "batches_done": 7}
    assert "7 batches into epoch 4, after the last scored epoch (3)" in unvalidated_weights(midway)
    no_validation = {"epoch": 3, "metrics": [{"epoch": 3, "test_acc": 98.0}]}
    stopped = {**no_validation, "train_config": {"epochs": 5}}
    assert "epoch 3 of 5 of a run without validation" in unvalidated_weights(stopped)
    whole = {**no_validation, "train_config": {"epochs": 3}}
    assert unvalidated_weights(whole) is None  # train.py's final model of a --val-size 0 run


def test_a_failed_evaluation_is_recorded_as_the_runs_failure(tmp_path, monkeypatch):
    def evaluate_fails(command, **_):
        return sweep.subprocess.CompletedProcess(command, 2, "", "error: --affine needs ...\n")

    FakeRuns(monkeypatch, failing=set())
    monkeypatch.setattr(sweep.subprocess, "run", evaluate_fails)
    run_record = {"name": "a", "flags": [], "evaluate": ["--affine"]}
    record = sweep.run_once(run_record, tmp_path / "a", "data")
    assert record["failed"] == {
        "script": "evaluate.py",
        "exit_status": 2,
        "log_tail": ["error: --affine needs ..."],
    }


def test_a_resumed_run_drops_init_from_which_train_refuses_beside_resume():
    flags = ["--dataset", "multimnist", "--init-from", "a.pt", "--epochs", "10", "--init-from=b.pt"]
    assert sweep.resume_flags(flags) == ["--dataset", "multimnist", "--epochs", "10"]
    assert sweep.resume_flags(["--init-f", "a.pt", "--lr", "1e-3"]) == ["--lr", "1e-3"]  # a prefix
    assert sweep.train_flags_problem(["--init-f", "a.pt"], DATA_DIR) is None  # as train.py takes it


# --- tools/conv_gradient_timing.py ---------------------------------------------------------

CONV_TOOL = "tools/conv_gradient_timing.py"


@pytest.mark.parametrize(
    "layer, way, compared",
    [
        ("conv1", "channels_last_gradients", {"grad_weight", "grad_bias"}),
        ("primary", "primary_conv_gradients", {"grad_input", "grad_weight", "grad_bias"}),
    ],
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_conv_timing_tool_times_both_ways_and_compares_their_gradients(
    layer, way, compared, dtype
):
    sizes = ("--batch", 3, "--size", 18, "--rounds", 2, "--repeats", 1, "--dtype", dtype)
    result = run_in_process(CONV_TOOL, "--layer", layer, *sizes)
    record = json.loads(result.stdout)
    assert (record["layer"], record["batch"], record["size"]) == (layer, 3, 18)
    assert record["dtype"] == dtype
    for timed in ("plain_autograd", way):
        assert 0 < record[f"{timed}_best_ms"] <= record[f"{timed}_median_ms"]
    differences = record["largest_difference"]
    assert set(differences) == compared
    assert max(differences.values()) < (0.1 if dtype == "bfloat16" else 1e-3)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--batch", 0), "--batch must be at least 1, got 0"),
        (("--size", 8), "--size must be at least 9 for --layer conv1, got 8"),
        (("--layer", "primary", "--size", 16), "--size must be at least 17 for --layer primary"),
        (("--batch", 10**5, "--size", 10**5), "out of memory at --batch 100000 --size 100000"),
    ],
)
def test_the_conv_timing_tool_refuses_sizes_it_cannot_time(args, message):
    result = run_in_process(CONV_TOOL, *args, check=False)
    assert result.returncode == 2
    assert_one_line_error(result, message)


# --- tools/bench_against.py ----------------------------------------------------------------

AGAINST_TOOL = REPO / "tools" / "bench_against.py"
TINY_BENCH = ["--", "--batch-size", "4", "--steps", "1", "--rounds", "1"]


def bench_against(folder, *args) -> subprocess.CompletedProcess:
    """tools/bench_against.py in its own process, run from `folder` (it times that checkout)."""
    command = [sys.executable, str(AGAINST_TOOL), *map(str, args)]
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=600)


@pytest.fixture
def clone(tmp_path):
    """A clone of this repository's HEAD, whose worktrees the tests can inspect."""
    folder = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(folder)], check=True)
    return folder


def worktrees(folder) -> list[str]:
    listing = subprocess.run(
        ["git", "worktree", "list"], cwd=folder, capture_output=True, text=True
    )
    return listing.stdout.splitlines()


@pytest.mark.slow  # four bench.py processes: about 20 s on Zen 3
def test_bench_against_alternates_the_arms_and_appends_every_result(clone, tmp_path):
    out = tmp_path / "bench" / "ab.jsonl"
    out.parent.mkdir()
    write_jsonl([{"kept": "an earlier record"}], out)
    result = bench_against(clone, "HEAD", "--rounds", 2, "--out", out, *TINY_BENCH)
    assert result.returncode == 0, result.stderr
    printed = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["arm"], r["round"]) for r in printed] == [
        ("before", 1),
        ("after", 1),
        ("after", 2),
        ("before", 2),
    ]  # the order flips every round
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True
    )
    assert {r["commit"] for r in printed} == {head.stdout.strip()}
    for record in printed:
        assert record["batch_size"] == 4 and 0 < record["train_ratio"]
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"kept": "an earlier record"},
        *printed,
    ]
    table = result.stderr.splitlines()
    assert table[0].split()[:2] == ["arm", "round"] and table[-2].split()[:2] == ["before", "med"]
    assert len(worktrees(clone)) == 1  # its own worktree is gone


@pytest.mark.slow  # a bench.py process: about 5 s
def test_bench_against_reports_a_failing_bench_and_removes_its_worktree(clone):
    (clone / "CapsNet.py").write_text("raise SystemExit('broken')\n")
    commit = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "broken"]
    subprocess.run(commit, cwd=clone, check=True)
    result = bench_against(clone, "HEAD", *TINY_BENCH)
    assert_one_line_error(result, "bench.py failed in the 'before' arm (exit status 1): broken")
    assert len(worktrees(clone)) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["no-such-commit"], "'no-such-commit' is not a commit of"),
        (["HEAD", "--rounds", "0"], "--rounds must be between 1 and 100, got 0"),
    ],
)
def test_bench_against_refuses_a_bad_commit_or_count(args, message):
    result = run_in_process("tools/bench_against.py", *args, check=False)
    assert result.returncode == 2
    assert_one_line_error(result, message)


@pytest.mark.parametrize(
    "script, args",
    [
        (AGAINST_TOOL, ["--help"]),
        (REPO / "time_to_accuracy.py", [str(REPO / "results" / "mnist_metrics.jsonl")]),
    ],
)
def test_the_record_tools_start_without_importing_torch(script, args):
    """bench_against.py runs git and bench.py, time_to_accuracy.py reads JSONL logs: neither
    needs torch's 2 s import (capslab.atomic and capslab.jsonl are free of it)."""
    check = (
        "import runpy, sys\n"
        f"sys.argv = [{str(script)!r}, *{args!r}]\n"
        "try:\n"
        f"    runpy.run_path({str(script)!r}, run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "False"


def test_bench_against_needs_a_git_checkout(tmp_path):
    assert_one_line_error(bench_against(tmp_path, "HEAD"), "is not in a git checkout")
