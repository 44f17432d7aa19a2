"""Train a grid of runs one at a time, resumably, and keep one JSON line per finished run.

    python sweep.py results/grids/recipe.json --data-dir ../shared/data
    python sweep.py results/grids/recipe.json --list        # what is done, running, to do
    python sweep.py results/grids/recipe.json --table       # the results as a Markdown table
    python sweep.py results/grids/table1.json --table --per-run --columns test "affine, translation"
    python sweep.py results/grids/table1.json --plot t1.png # test error per seed, and the paper's
    python sweep.py results/grids/table1.json --compare 'capsnet-r3-*' 'capsnet-r1-*'

A grid file is a JSON list of runs, {"name": ..., "flags": [...]} for train.py, or an object
{"evaluate": [...], "runs": [...]}, whose evaluate.py flags (say --affine) score each run's
final checkpoint (last.pt) when it ends; a run's own "evaluate" list replaces the grid's. A run
may also carry "paper", the paper's figure for it, which the table shows.

The whole grid is checked before any run trains: each name a string, unique (also ignoring
case) and usable as one folder name; the flags lists of strings that train.py accepts, without
the flags the sweep sets itself; every problem is named in one error.

Each run trains in runs/sweep/NAME (or --runs-dir); a finished run is skipped, an interrupted
one resumed. When a run ends, its final and best epochs (and its evaluation) go as one line to
the results file beside the grid file (GRID.results.jsonl). A run whose train.py or evaluate.py
fails goes there too, with the exit status and the last lines of its output, and the sweep
moves on to the next run; a later sweep skips it unless given --retry-failed, and a sweep that
leaves a failed run behind exits with an error naming them. The grid file is read again before
each run, so runs can be added or reordered while a sweep is going. Ctrl-C or SIGTERM stops the
current run resumably (it saves after its current batch) and ends the sweep; a run that stopped
before the end of its budget is never recorded as finished.

The table has one row per recipe: runs whose names differ only in a final "-sN" (the seed)
are one row, with the mean and sample standard deviation over them, and the machine(s) and
precision they trained on. --compare A B sets the test errors (or another --column) of the
recipes matching the shell pattern A against those matching B: the difference of the means,
its standard error, and a two-sided permutation test, which assumes no distribution: exact
(every way of splitting the pooled runs into groups of those sizes) up to EXACT_SPLITS splits,
beyond that Monte-Carlo (PERMUTATIONS random splits drawn with a fixed seed, so a rerun gives
the same p).
"""

from capslab.errors import exit_on_ctrl_c_while_loading

exit_on_ctrl_c_while_loading(__name__)  # first: torch takes seconds to load

# isort: split
import argparse
import contextlib
import io
import json
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
from collections import deque
from fnmatch import fnmatchcase
from functools import partial
from itertools import combinations
from pathlib import Path

from capslab.checkpoint import load_checkpoint
from capslab.data import AFFINE_FAMILIES, add_data_flags
from capslab.errors import (
    UserError,
    counted,
    exit_on_user_error,
    first_line,
    flag_name,
    make_output_folder,
)
from capslab.figures import plot_test_errors
from capslab.flags import parse_flags
from capslab.jsonl import chosen_by_validation, is_number, json_type, read_jsonl, write_jsonl
from capslab.run_plan import build_parser, configs_from_flags
from capslab.scoring import build_evaluate_parser, check_evaluate_args

RUN_KEYS = ("name", "flags", "evaluate", "paper")  # what a run of the grid may hold
GRID_KEYS = ("evaluate", "runs")  # and the grid object
# train.py settings the sweep sets itself, or that would never leave a finished run.
SWEEP_SETS = ("checkpoint_dir", "data_dir", "resume", "dry_run")
EVALUATE_SETS = ("checkpoint", "data_dir", "json")  # evaluate.py settings the sweep sets
LOG_TAIL = 20  # lines of a failed run's output kept in the results file
MAX_NAME_BYTES = 200  # a run folder's name: filesystems stop at 255, and temporaries add to it
EXACT_SPLITS = 200_000  # beyond this many splits, --compare draws PERMUTATIONS of them
PERMUTATIONS = 100_000
PERMUTATION_SEED = 0


class FlagError(Exception):
    """train.py's parser refused a grid's flags (instead of printing usage and exiting)."""


def read_grid(path: Path, data_dir: str) -> list[dict]:
    """The runs, each with its "evaluate" flags (the grid's unless it has its own), after
    checking the whole grid against the data in data_dir: every problem is named in one
    UserError."""
    try:
        grid = json.loads(path.read_text())
    except (OSError, ValueError) as error:  # ValueError: not JSON, or not even text
        raise UserError(f"{path} is not a readable grid file ({first_line(error)})") from error
    runs = grid.get("runs") if isinstance(grid, dict) else grid
    if not isinstance(runs, list) or not runs:
        raise UserError(
            f"{path} must hold a JSON list of {{'name': ..., 'flags': [...]}} objects, "
            "or {'evaluate': [...], 'runs': [that list]}"
            + ("; it holds no run" if runs == [] else "")
        )
    evaluate = grid.get("evaluate", []) if isinstance(grid, dict) else []
    problems = (
        [f"unknown key {key!r}" for key in grid if key not in GRID_KEYS]
        if isinstance(grid, dict)
        else []
    )
    problems += flag_list_problems("the grid's 'evaluate'", evaluate, evaluate_flags_problem)
    problems += runs_problems(runs, data_dir)
    if problems:
        raise UserError(
            f"{path} has {len(problems)} problem(s); no run of it trains until they are fixed: "
            + "; ".join(problems)
        )
    return [{"evaluate": evaluate, **run} for run in runs]


def runs_problems(runs: list, data_dir: str) -> list[str]:
    """Every problem of the grid's runs: their names, keys and flags (a folder dataset's
    read from data_dir)."""
    check_train_flags = partial(train_flags_problem, data_dir=data_dir)
    problems, seen = [], {}
    for number, run in enumerate(runs, start=1):
        if not isinstance(run, dict):
            problems.append(f"run {number} is a {json_type(run)}, not an object")
            continue
        name = run.get("name")
        where = f"run {number} ({name!r})" if isinstance(name, str) else f"run {number}"
        problem = name_problem(name)
        if problem:
            problems.append(f"{where}: {problem}")
        elif name.casefold() in seen:
            problems.append(f"{where}: run {seen[name.casefold()]} has the same name")
        else:
            seen[name.casefold()] = number  # same folder on case-insensitive disks
        problems += [f"{where}: unknown key {key!r}" for key in run if key not in RUN_KEYS]
        if "flags" not in run:
            problems.append(f"{where}: no 'flags' (a list, [] for train.py's defaults)")
        else:
            problems += flag_list_problems(f"{where}: 'flags'", run["flags"], check_train_flags)
        if "evaluate" in run:
            problems += flag_list_problems(
                f"{where}: 'evaluate'", run["evaluate"], evaluate_flags_problem
            )
        if "paper" in run and not isinstance(run["paper"], str):
            problems.append(f"{where}: 'paper' must be a string like '0.34 ± 0.032%'")
        elif "paper" in run:
            try:
                paper_error(run["paper"])
            except UserError as error:
                problems.append(f"{where}: {error}")
    return problems


def name_problem(name) -> str | None:
    """What keeps `name` from naming one folder inside --runs-dir (None: nothing)."""
    if not isinstance(name, str):
        return "no 'name'" if name is None else f"its name is a {json_type(name)}, not a string"
    if not name.strip() or name in (".", ".."):
        return "its name is empty or a dot: it names no folder of its own"
    if "/" in name or "\\" in name or name.startswith("."):
        return "its name has a path separator or a leading dot: it would leave --runs-dir"
    if name != name.strip() or any(ord(character) < 32 for character in name):
        return "its name has leading or trailing spaces or control characters"
    if len(name.encode()) > MAX_NAME_BYTES:
        return f"its name is longer than {MAX_NAME_BYTES} bytes, too long for a folder"
    return None


def flag_list_problems(where: str, flags, check) -> list[str]:
    if not isinstance(flags, list) or not all(isinstance(flag, str) for flag in flags):
        return [f"{where} must be a list of strings, as on a command line"]
    problem = check(flags)
    return [f"{where}: {problem}"] if problem else []


def train_flags_problem(flags: list[str], data_dir: str) -> str | None:
    """What train.py would refuse in these flags, given the sweep's data_dir, found with
    train.py's own parser and configs, or a flag the sweep sets itself (None: nothing)."""

    # The sweep launches train.py, so it checks the flags with train.py's own parser and
    # configs: a typo in the grid's last run is found before the first run spends hours training.
    try:
        args, given = parse_flags(refusing(build_parser()), flags)
        args.data_dir = data_dir  # the sweep passes its own: a folder dataset is read there
        with contextlib.redirect_stdout(io.StringIO()):  # a folder's notes: train.py prints them
            configs_from_flags(args)  # the values: "--epochs must be ..."
    except (FlagError, UserError) as error:
        return first_line(error)
    taken = [flag_name(name) for name in SWEEP_SETS if name in given]
    return f"{', '.join(taken)}: the sweep sets these itself" if taken else None


def refusing(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The parser, raising FlagError where it would print usage or help and exit."""
    parser.error, parser.exit = refuse, lambda *_: refuse()
    parser.print_help = lambda *_: None
    return parser


def refuse(message: str = "") -> None:
    raise FlagError(message.strip() or "the flags ask for help")


def evaluate_flags_problem(flags: list[str]) -> str | None:
    """What evaluate.py would refuse in these flags, found with its own parser, or a flag the
    sweep sets itself (None: nothing): checked before any run trains, as train.py's are."""
    try:
        args, given = parse_flags(refusing(build_evaluate_parser()), flags)
        check_evaluate_args(args)
    except (FlagError, UserError) as error:
        return first_line(error)
    if taken := [flag_name(name) for name in EVALUATE_SETS if name in given]:
        return f"{', '.join(taken)}: the sweep sets these itself"  # also as --check=X
    if "figures" in given:
        return (
            "--figures would write every run's figures into the one folder: run evaluate.py "
            "--figures on the run's checkpoint instead"
        )
    return None


def records(folder: Path) -> list[dict]:
    log = folder / "metrics.jsonl"
    return read_jsonl(log, "metrics log") if log.exists() else []


def result_problem(record: dict) -> str | None:
    """What in one results line would break --table, --compare or --plot (None: nothing)."""
    name = record.get("name")
    if not isinstance(name, str):
        return "no run 'name'" if name is None else f"its 'name' is a {json_type(name)}"
    if "failed" in record:
        failed = record["failed"]
        return None if isinstance(failed, dict) else f"run {name}: 'failed' is not an object"
    if not isinstance(record.get("final"), dict):
        return f"run {name} has no 'final' epoch record (an object)"
    for column, keys in COLUMNS.items():
        value = measure(record, keys)
        if value is not None and not (is_number(value) and math.isfinite(value)):
            shown = json.dumps(value)[:40]  # NaN and Infinity too: they would poison the means
            return f"run {name}: {'.'.join(keys)} is {shown}, not a finite number ({column!r})"
    log = record.get("log", [])
    if not isinstance(log, list) or not all(isinstance(entry, dict) for entry in log):
        return f"run {name}: 'log' is not a list of epoch records (objects)"
    if "paper" in record and not isinstance(record["paper"], str):
        return f"run {name}: 'paper' is not a string like '0.34 ± 0.032%'"
    return None


def read_results(results: Path) -> list[dict]:
    """The runs' results, finished or failed, one JSON line each; none before the first ends."""
    return read_jsonl(results, "results file", result_problem) if results.exists() else []


def latest_results(results: Path) -> dict[str, dict]:
    """Each run's latest result (a retried run's replaces its failure)."""
    return {record["name"]: record for record in read_results(results)}


def record_result(record: dict, results: Path) -> None:
    """Add a run's result to the results file, replacing any earlier one of the same run."""
    kept = [old for old in read_results(results) if old["name"] != record["name"]]
    write_jsonl([*kept, record], results)


def failure(run: dict, script: str, code: int, tail: list[str]) -> dict:
    """A failed run's results line: which script, its exit status, its output's last lines."""
    return {
        "name": run["name"],
        "flags": run["flags"],
        "failed": {"script": script, "exit_status": code, "log_tail": tail},
    }


def exit_status(code: int) -> str:
    """'exit 1', or 'killed by signal 9' (a negative code from subprocess)."""
    return f"killed by signal {-code}" if code < 0 else f"exit {code}"


def resume_flags(flags: list[str]) -> list[str]:
    """A run's flags for resuming it: without --init-from, which only starts a run (train.py
    refuses it beside --resume, and the run's own checkpoint holds its weights). argparse
    takes any unambiguous prefix of a flag; the grid's check already refused ambiguous ones."""
    kept, skip_value = [], False
    for flag in flags:
        name, has_value = flag.split("=", 1)[0], "=" in flag
        if skip_value:
            skip_value = False
        elif len(name) > 2 and "--init-from".startswith(name):
            skip_value = not has_value
        else:
            kept.append(flag)
    return kept


def train(run: dict, folder: Path, data_dir: str) -> tuple[int, list[str]]:
    """train.py on the run, its output echoed; its exit status and its last LOG_TAIL lines."""
    resuming = (folder / "last.pt").exists()
    command = [
        sys.executable,
        str(Path(__file__).parent / "train.py"),
        *(resume_flags(run["flags"]) if resuming else run["flags"]),
        "--data-dir",
        data_dir,
        "--checkpoint-dir",
        str(folder),
        "--quiet",
    ]
    if resuming:
        command.append("--resume")
    print(f"[{run['name']}] {' '.join(command[1:])}", flush=True)
    # In a session of its own, the run hears a Ctrl-C or SIGTERM once, from here, however it
    # was sent (a terminal's Ctrl-C alone would reach it directly; a kill of the sweep not).
    # Its stderr joins its stdout on ours, in order, so that a failure's tail reads as it ran;
    # unbuffered, so that each line shows as it is printed.
    process = subprocess.Popen(
        command,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    tail: deque[str] = deque(maxlen=LOG_TAIL)
    interrupted = False
    while True:
        try:
            for line in process.stdout:
                print(line, end="", flush=True)
                tail.append(line.rstrip("\n"))
            code = process.wait()
            break
        except KeyboardInterrupt:
            # The first: the run saves after its current batch; a second: it stops unsaved.
            interrupted = True
            process.send_signal(signal.SIGINT)
    if interrupted:
        raise KeyboardInterrupt
    return code, list(tail)


def finished(folder: Path) -> bool:
    """Whether the run's last.pt holds its whole epoch budget. (train.py also exits 0 when a
    signal stopped it early and it saved.)"""
    checkpoint = load_checkpoint(folder / "last.pt")
    return checkpoint["epoch"] >= checkpoint["train_config"]["epochs"]


def complete(folder: Path) -> bool:
    """finished(), and False where last.pt is missing or unreadable."""
    try:
        return finished(folder)
    except (UserError, KeyError, TypeError):  # no file, or one without its budget
        return False


def evaluation(run: dict, folder: Path, data_dir: str) -> tuple[int, list[str], dict | None]:
    """evaluate.py --json with the run's "evaluate" flags on its final checkpoint: its exit
    status, the last lines of its other output, and its scores (None without flags)."""
    if not run["evaluate"]:
        return 0, [], None
    command = [
        sys.executable,
        str(Path(__file__).parent / "evaluate.py"),
        "--checkpoint",
        str(folder / "last.pt"),
        "--data-dir",
        data_dir,
        "--json",
        *run["evaluate"],
    ]
    print(f"[{run['name']}] {' '.join(command[1:])}", flush=True)
    done = subprocess.run(command, capture_output=True, text=True, errors="replace")
    print(done.stderr, end="", flush=True)  # its messages, on our stdout as a run's are
    tail = done.stderr.splitlines()[-LOG_TAIL:]
    try:
        result = json.loads(done.stdout) if done.returncode == 0 else None
    except ValueError:
        result = None
    if not isinstance(result, dict):
        tail = (tail + done.stdout.splitlines())[-LOG_TAIL:]
        return done.returncode or 1, tail, None  # exit 0 without a JSON object fails too
    result.pop("confusion_matrix", None)  # in the run's own evaluation when wanted, not here
    return 0, tail, result


def summary(run: dict, folder: Path, scores: dict | None) -> dict:
    log = records(folder)
    best = chosen_by_validation(log) or log[-1]
    return {
        "name": run["name"],
        "flags": run["flags"],
        **({"paper": run["paper"]} if "paper" in run else {}),
        "final": log[-1],
        "best_by_val": best,
        **({"evaluation": scores} if scores else {}),
        "log": log,
    }


# The table's columns: where each run's record keeps the value (missing: not measured), and
# its unit ("%" unless named here).
COLUMNS = {
    "val": ("final", "val_acc"),
    "test": ("final", "test_acc"),
    "test error": ("final", "test_acc"),  # 100 - test, shown beside the paper's error
    "test, raw weights": ("final", "raw_test_acc"),
    "test, averaged": ("final", "ema_test_acc"),
    **{
        f"affine, {family}": ("evaluation", "affine", "accuracy", family)
        for family in AFFINE_FAMILIES
    },
    "coupling entropy (nats)": ("evaluation", "routing", "coupling_entropy"),
    "std of c_ij across inputs": ("evaluation", "routing", "coupling_std"),
    "test at r=1": ("evaluation", "routing", "accuracy_by_iterations", "1"),
    "test at r=3": ("evaluation", "routing", "accuracy_by_iterations", "3"),
    "wall (min)": ("final", "wall_seconds"),
}
UNITS = {"coupling entropy (nats)": "", "std of c_ij across inputs": "", "wall (min)": ""}


def measure(run: dict, keys: tuple[str, ...]):
    """The value at the path `keys` inside the run's record, None where it stops short."""
    value = run
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def measured(run: dict, column: str) -> float | None:
    value = measure(run, COLUMNS[column])
    if value is None:
        return None
    if column == "test error":
        return 100 - value
    return value / 60 if column == "wall (min)" else value


def trained_on(runs: list[dict]) -> str:
    """Where a row's runs trained: each machine and precision their epoch records name."""
    places = {
        f"{record['machine']} ({'bf16' if record.get('bf16') else 'float32'})"
        for run in runs
        for record in run.get("log", [])
        if "machine" in record
    }
    return ", ".join(sorted(places)) or "-"


def recipe_name(name: str) -> str:
    """The run's name without its final "-sN" seed suffix."""
    return re.sub(r"-s\d+$", "", name)


def seed_of(name: str) -> str:
    """The N of the run name's final "-sN", or "-" without one."""
    return name[len(recipe_name(name)) :].lstrip("-s") or "-"


def mean_and_spread(values: list[float], unit: str) -> str:
    """ "99.47%" for one value, "99.47 ± 0.03% (2)" for several: mean, sample std, count."""
    digits = 4 if unit == "" and max(values) < 10 else 2 if unit else 1
    if len(values) == 1:
        return f"{values[0]:.{digits}f}{unit}"
    spread = statistics.stdev(values)
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}{unit} ({len(values)})"


def finished_runs(results: Path, per_run: bool = False) -> dict[str, list[dict]]:
    """The results file's finished runs (not the failed), grouped by recipe (their names
    without the seed), in order; with per_run, each run on its own."""
    recipes: dict[str, list[dict]] = {}
    for run in latest_results(results).values():
        if "failed" in run:
            continue
        recipes.setdefault(run["name"] if per_run else recipe_name(run["name"]), []).append(run)
    return recipes


def paper_error(figure: str) -> tuple[float, float | None]:
    """The paper's "0.34 ± 0.032%" as (0.34, 0.032); "0.39%" as (0.39, None)."""
    number = r"(\d+(?:\.\d*)?|\.\d+)"  # 0.34, 5, 5., .5; not "1.2.3" or "."
    match = re.fullmatch(rf"\s*{number}\s*(?:±\s*{number})?\s*%\s*", figure)
    if match is None:
        raise UserError(f"the paper's figure {figure!r} is not a test error like '0.34 ± 0.032%'")
    mean, spread = match.groups()
    return float(mean), float(spread) if spread else None


def errors_by_recipe(
    results: Path,
) -> dict[str, tuple[list[float], tuple[float, float | None] | None]]:
    """Each recipe's test errors (%, one per seed) and the paper's (mean, std), if it has one."""
    return {
        name: (
            [error for run in group if (error := measured(run, "test error")) is not None],
            paper_error(group[0]["paper"]) if "paper" in group[0] else None,
        )
        for name, group in finished_runs(results).items()
    }


def table_rows(results: Path, wanted: list[str] | None = None, per_run: bool = False) -> list[str]:
    """One Markdown row per recipe (its seeds together), or per run; the wanted columns (all by
    default) that some run measured."""
    recipes = finished_runs(results, per_run)
    runs = [run for group in recipes.values() for run in group]
    papers = any("paper" in run for run in runs)
    columns = [
        column
        for column in wanted or COLUMNS
        if any(measured(run, column) is not None for run in runs)
        and (papers or column != "test error")
    ]
    header = ["run", "seeds", *(["paper's test error"] if papers else []), *columns, "trained on"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, group in recipes.items():
        seeds = [seed_of(run["name"]) for run in group]
        cells = [name, ", ".join(seeds)]
        if papers:
            cells.append(group[0].get("paper", "-"))
        for column in columns:
            values = [value for run in group if (value := measured(run, column)) is not None]
            unit = UNITS.get(column, "%")
            cells.append(mean_and_spread(values, unit) if values else "-")
        cells.append(trained_on(group))
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def values_matching(recipes: dict[str, list[dict]], pattern: str, column: str) -> list[float]:
    """The column's value in every finished run whose recipe matches the shell pattern."""
    values = [
        value
        for name, group in recipes.items()
        if fnmatchcase(name, pattern)
        for run in group
        if (value := measured(run, column)) is not None
    ]
    if len(values) < 2:
        raise UserError(
            f"{pattern!r} matches {len(values)} finished run(s) with a {column!r}; "
            "a comparison needs 2"
        )
    return values


def permutation_test(first: list[float], second: list[float]) -> tuple[float, int]:
    """Two-sided exact permutation test of the difference of the means: the share of all
    splits of the pooled values into groups of these sizes whose difference is at least as
    large as the observed one, and the number of splits."""
    total = sum(first) + sum(second)
    observed = abs(statistics.mean(first) - statistics.mean(second))
    differences = [
        abs(in_first / len(first) - (total - in_first) / len(second))
        for in_first in map(sum, combinations(first + second, len(first)))
    ]
    as_large = sum(difference >= observed - 1e-9 for difference in differences)
    return as_large / len(differences), len(differences)


def sampled_permutation_test(
    first: list[float], second: list[float], draws: int = PERMUTATIONS, seed: int = PERMUTATION_SEED
) -> float:
    """Two-sided Monte-Carlo permutation test, for when the splits are too many to count: the
    share of `draws` seeded random splits (the observed one counted once more, so p > 0, as
    Phipson and Smyth 2010 advise) whose difference of the means is at least the observed."""
    pooled, size = first + second, len(first)
    total = sum(pooled)
    observed = abs(statistics.mean(first) - statistics.mean(second))
    generator = random.Random(seed)
    as_large = 0
    for _ in range(draws):
        in_first = sum(generator.sample(pooled, size))
        difference = abs(in_first / size - (total - in_first) / len(second))
        as_large += difference >= observed - 1e-9
    return (as_large + 1) / (draws + 1)


def permutation_line(first: list[float], second: list[float]) -> str:
    """The permutation test that fits the sizes, in words: exact, or Monte-Carlo."""
    splits = math.comb(len(first) + len(second), len(first))
    if splits <= EXACT_SPLITS:
        p_value, splits = permutation_test(first, second)
        return f"exact permutation test p = {p_value:.2f} over {splits} splits"
    p_value = sampled_permutation_test(first, second)
    return (
        f"Monte-Carlo permutation test p = {p_value:.3f} over {PERMUTATIONS} random splits "
        f"(seed {PERMUTATION_SEED}) of the {splits:.2e} possible"
    )


def contrast(
    results: Path, first_pattern: str, second_pattern: str, column: str = "test error"
) -> str:
    """One line: A's mean of the column minus B's, its standard error, the permutation test."""
    recipes = finished_runs(results)
    both = [
        name
        for name in recipes
        if fnmatchcase(name, first_pattern) and fnmatchcase(name, second_pattern)
    ]
    if both:
        raise UserError(f"{', '.join(both)} matches both {first_pattern!r} and {second_pattern!r}")
    first = values_matching(recipes, first_pattern, column)
    second = values_matching(recipes, second_pattern, column)
    difference = statistics.mean(first) - statistics.mean(second)
    standard_error = math.sqrt(
        statistics.variance(first) / len(first) + statistics.variance(second) / len(second)
    )
    return (
        f"{first_pattern} ({len(first)} runs) minus {second_pattern} ({len(second)} runs): "
        f"{column} {difference:+.3f}, standard error {standard_error:.3f}; "
        + permutation_line(first, second)
    )


def next_run(
    grid_path: Path,
    results: Path,
    runs_dir: Path,
    data_dir: str,
    listing: bool,
    retry_failed: bool = False,
    tried: frozenset[str] = frozenset(),
) -> dict | None:
    """The first run of the grid that has no result yet, or a failed one with retry_failed,
    that this sweep has not tried (printing each one's state)."""
    outcomes = latest_results(results)
    for run in read_grid(grid_path, data_dir):
        name, outcome = run["name"], outcomes.get(run["name"])
        failed = outcome is not None and "failed" in outcome
        if outcome is not None and not failed:
            print(f"[{name}] done")
        elif failed and (name in tried or not (retry_failed or listing)):
            print(f"[{name}] failed ({failure_line(outcome)}); retry with --retry-failed")
        elif listing:
            state = f"failed ({failure_line(outcome)}), " if failed else ""
            logged = len(records(runs_dir / name))
            progress = f"{counted(logged, 'epoch')} logged" if logged else "to do"
            print(f"[{name}] {state}{progress}")
        elif name not in tried:
            return run
    return None


def failure_line(outcome: dict) -> str:
    """'train.py exit 1' for a failed run's results line."""
    failed = outcome["failed"]
    code = failed.get("exit_status")
    status = exit_status(code) if isinstance(code, int) else "failed"
    return f"{failed.get('script', 'train.py')} {status}"


def build_sweep_parser() -> argparse.ArgumentParser:
    numbers = {"EXACT_SPLITS": f"{EXACT_SPLITS:,}", "PERMUTATIONS": f"{PERMUTATIONS:,}"}
    description = re.sub("|".join(numbers), lambda name: numbers[name[0]], __doc__)
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("grid", type=Path, help="JSON grid file")
    add_data_flags(parser, test_subset=False)
    parser.add_argument(
        "--runs-dir",
        type=Path,
        default=Path("runs/sweep"),
        help="run folders (default: runs/sweep)",
    )
    parser.add_argument(
        "--list", action="store_true", help="print each run's state and stop (default: off)"
    )
    parser.add_argument(
        "--retry-failed",
        action="store_true",
        help="run again the runs whose last try failed, as recorded in the results file "
        "(default: skip them)",
    )
    parser.add_argument(
        "--table",
        action="store_true",
        help="print the finished runs as a Markdown table (default: off)",
    )
    parser.add_argument(
        "--columns",
        nargs="+",
        choices=COLUMNS,
        metavar="COLUMN",
        help="the table's columns, in this order: any of "
        + ", ".join(map(repr, COLUMNS))
        + " (default: every measured one)",
    )
    parser.add_argument(
        "--per-run",
        action="store_true",
        help="one table row per run instead of per recipe (default: off)",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="PNG",
        help="draw each recipe's test error per seed, beside the paper's, into PNG (default: none)",
    )
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("A", "B"),
        help="set the test errors of the recipes matching shell pattern A against B's "
        "(default: off)",
    )
    parser.add_argument(
        "--column",
        choices=COLUMNS,
        default="test error",
        metavar="COLUMN",
        help="what --compare sets against each other: one of the names --columns takes "
        "(default: 'test error')",
    )
    return parser


def main(argv=None) -> None:
    parser = build_sweep_parser()
    args = parser.parse_args(argv)
    if (args.columns or args.per_run) and not args.table:
        parser.error("--columns and --per-run shape the table: add --table")
    results = args.grid.with_suffix(".results.jsonl")
    if args.table or args.plot or args.compare:
        report(args, results)
    else:
        run_sweep(args, results)


def report(args: argparse.Namespace, results: Path) -> None:
    """--compare, --table and --plot: what the finished runs say; nothing trains."""
    if args.compare:
        print(contrast(results, *args.compare, args.column))
    if args.plot and args.plot.is_dir():
        raise UserError(f"--plot {args.plot} is a folder: name the PNG to write")
    if args.plot and args.plot.suffix.lower() != ".png":
        raise UserError(f"--plot {args.plot}: the plot is a PNG, so name a .png file")
    if (args.table or args.plot) and not results.exists():
        raise UserError(f"no run of {args.grid} has finished yet ({results} is missing)")
    if args.table:
        print("\n".join(table_rows(results, args.columns, args.per_run)))
    if args.plot:
        make_output_folder(args.plot.parent, "--plot's folder")
        print(f"wrote {plot_test_errors(errors_by_recipe(results), args.plot)}")


def run_sweep(args: argparse.Namespace, results: Path) -> None:
    """The sweep (or --list), with Ctrl-C and SIGTERM as one-line stops that keep what ran."""
    if args.grid.is_file() and not args.list:  # the results go beside it: found now, not later
        make_output_folder(results.parent, "the grid's folder")
    # Both signals raise KeyboardInterrupt, SIGINT too: a sweep started with `&` from a script
    # inherits an ignored SIGINT, and would otherwise not hear `kill -INT`.
    stopping = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.signal(number, signal.default_int_handler) for number in stopping}
    try:
        sweep(args.grid, results, args.runs_dir, args.data_dir, args.list, args.retry_failed)
    except KeyboardInterrupt:
        message = "interrupted: finished runs are kept; run the sweep again to resume"
        raise UserError(message) from None
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def sweep(
    grid: Path,
    results: Path,
    runs_dir: Path,
    data_dir: str,
    listing: bool,
    retry_failed: bool = False,
) -> None:
    """Train and record each run in turn; a failed run is recorded and the next one goes on.
    At the end, a UserError names the grid's runs whose latest try failed."""
    tried: set[str] = set()
    while run := next_run(
        grid, results, runs_dir, data_dir, listing, retry_failed, frozenset(tried)
    ):
        tried.add(run["name"])
        record_result(run_once(run, runs_dir / run["name"], data_dir), results)
    if listing:
        return
    outcomes = latest_results(results)
    failed = [
        f"{run['name']} ({failure_line(outcomes[run['name']])})"
        for run in read_grid(grid, data_dir)
        if "failed" in outcomes.get(run["name"], {})
    ]
    if failed:
        raise UserError(
            f"{len(failed)} run(s) failed: {', '.join(failed)}; each one's exit status and last "
            f"output lines are in {results}; fix them and run again with --retry-failed"
        )


def run_once(run: dict, folder: Path, data_dir: str) -> dict:
    """Train (or resume) one run and evaluate it: its results line, finished or failed."""
    if complete(folder):  # trained before the sweep was stopped; its evaluation is missing
        print(f"[{run['name']}] trained already: evaluating it", flush=True)
    else:
        code, tail = train(run, folder, data_dir)
        if code != 0:
            print(f"[{run['name']}] failed: train.py {exit_status(code)}", flush=True)
            return failure(run, "train.py", code, tail)
    if not complete(folder):  # train.py exits 0 when a signal sent to it alone stopped it
        raise UserError(
            f"run {run['name']} ended (exit 0) before the end of its budget; "
            "run the sweep again to resume it"
        )
    code, tail, scores = evaluation(run, folder, data_dir)
    if code != 0:
        print(f"[{run['name']}] failed: evaluate.py {exit_status(code)}", flush=True)
        return failure(run, "evaluate.py", code, tail)
    return summary(run, folder, scores)


if __name__ == "__main__":
    exit_on_user_error(main)
