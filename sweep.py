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

Each run trains in runs/sweep/NAME (or --runs-dir); a finished run is skipped, an interrupted
one resumed. When a run ends, its final and best epochs (and its evaluation) go as one line to
the results file beside the grid file (GRID.results.jsonl). The grid file is read again before
each run, so runs can be added or reordered while a sweep is going. Ctrl-C or SIGTERM stops the
current run resumably (it saves after its current batch) and ends the sweep; a run that stopped
before the end of its budget is never recorded as finished.

The table has one row per recipe: runs whose names differ only in a final "-sN" (the seed)
are one row, with the mean and sample standard deviation over them, and the machine(s) and
precision they trained on. --compare A B sets the test errors (or another --column) of the
recipes matching the shell pattern A against those matching B: the difference of the means,
its standard error, and an exact two-sided permutation test (every way of splitting the pooled
runs into groups of those sizes), which assumes no distribution.
"""

import argparse
import json
import math
import re
import signal
import statistics
import subprocess
import sys
from fnmatch import fnmatchcase
from itertools import combinations
from pathlib import Path

from capslab.checkpoint import load_checkpoint
from capslab.data import AFFINE_FAMILIES, add_data_flags
from capslab.errors import UserError, exit_on_user_error
from capslab.figures import plot_test_errors
from capslab.jsonl import read_jsonl, write_jsonl
from capslab.training import chosen_by_validation


def read_grid(path: Path) -> list[dict]:
    """The runs, each with its "evaluate" flags (the grid's unless it has its own)."""
    try:
        grid = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{path} is not a readable grid file ({error})") from error
    runs = grid.get("runs") if isinstance(grid, dict) else grid
    if not isinstance(runs, list) or not all(
        isinstance(run, dict) and {"name", "flags"} <= set(run) for run in runs
    ):
        raise UserError(
            f"{path} must hold a JSON list of {{'name': ..., 'flags': [...]}} objects, "
            "or {'evaluate': [...], 'runs': [that list]}"
        )
    evaluate = grid.get("evaluate", []) if isinstance(grid, dict) else []
    return [{"evaluate": evaluate, **run} for run in runs]


def records(folder: Path) -> list[dict]:
    log = folder / "metrics.jsonl"
    return read_jsonl(log, "metrics log") if log.exists() else []


def read_results(results: Path) -> list[dict]:
    """The finished runs' summaries, one JSON line each; none before the first has finished."""
    return read_jsonl(results, "results file") if results.exists() else []


def finished_names(results: Path) -> set[str]:
    return {run["name"] for run in read_results(results)}


def train(run: dict, folder: Path, data_dir: str) -> int:
    command = [
        sys.executable,
        str(Path(__file__).parent / "train.py"),
        *run["flags"],
        "--data-dir",
        data_dir,
        "--checkpoint-dir",
        str(folder),
        "--quiet",
    ]
    if (folder / "last.pt").exists():
        command.append("--resume")
    print(f"[{run['name']}] {' '.join(command[1:])}", flush=True)
    # In a session of its own, the run hears a Ctrl-C or SIGTERM once, from here, however it
    # was sent (a terminal's Ctrl-C alone would reach it directly; a kill of the sweep not).
    process = subprocess.Popen(command, start_new_session=True)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.send_signal(signal.SIGINT)  # the run saves after its current batch
        wait_through_interrupts(process)
        raise


def wait_through_interrupts(process: subprocess.Popen) -> None:
    while True:
        try:
            process.wait()
            return
        except KeyboardInterrupt:
            process.send_signal(signal.SIGINT)  # a second one: the run stops without saving


def finished(folder: Path) -> bool:
    """Whether the run's last.pt holds its whole epoch budget. (train.py also exits 0 when a
    signal stopped it early and it saved.)"""
    checkpoint = load_checkpoint(folder / "last.pt")
    return checkpoint["epoch"] >= checkpoint["train_config"]["epochs"]


def evaluation(run: dict, folder: Path, data_dir: str) -> dict | None:
    """evaluate.py --json with the run's "evaluate" flags on its final checkpoint, or None."""
    if not run["evaluate"]:
        return None
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
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise UserError(f"evaluating run {run['name']} failed (exit {done.returncode})")
    result = json.loads(done.stdout)
    result.pop("confusion_matrix", None)  # in the run's own evaluation when wanted, not here
    return result


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


def measured(run: dict, column: str) -> float | None:
    value = run
    for key in COLUMNS[column]:
        value = value.get(key) if isinstance(value, dict) else None
    if value is None:
        return None
    if column == "test error":
        return 100 - value
    return value / 60 if column == "wall (min)" else value


def trained_on(runs: list[dict]) -> str:
    """Where a row's runs trained: each machine and precision their epoch records name."""
    places = {
        f"{record['machine']} ({'bf16' if record['bf16'] else 'float32'})"
        for run in runs
        for record in run["log"]
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
    """The results file's runs, grouped by recipe (their names without the seed), in order;
    with per_run, each run on its own."""
    recipes: dict[str, list[dict]] = {}
    for run in read_results(results):
        recipes.setdefault(run["name"] if per_run else recipe_name(run["name"]), []).append(run)
    return recipes


def paper_error(figure: str) -> tuple[float, float | None]:
    """The paper's "0.34 ± 0.032%" as (0.34, 0.032); "0.39%" as (0.39, None)."""
    match = re.fullmatch(r"\s*([\d.]+)\s*(?:±\s*([\d.]+))?\s*%\s*", figure)
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
            [measured(run, "test error") for run in group],
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
    p_value, splits = permutation_test(first, second)
    return (
        f"{first_pattern} ({len(first)} runs) minus {second_pattern} ({len(second)} runs): "
        f"{column} {difference:+.3f}, standard error {standard_error:.3f}; "
        f"exact permutation test p = {p_value:.2f} over {splits} splits"
    )


def next_run(grid_path: Path, results: Path, runs_dir: Path, listing: bool) -> dict | None:
    """The first run of the grid that has no result yet (printing each one's state)."""
    done = finished_names(results)
    for run in read_grid(grid_path):
        if run["name"] in done:
            print(f"[{run['name']}] done")
        elif listing:
            print(f"[{run['name']}] {len(records(runs_dir / run['name']))} epochs logged")
        else:
            return run
    return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
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
        help="what --compare sets against each other (default: test error)",
    )
    args = parser.parse_args(argv)
    if (args.columns or args.per_run) and not args.table:
        parser.error("--columns and --per-run shape the table: add --table")
    results = args.grid.with_suffix(".results.jsonl")
    if args.compare:
        print(contrast(results, *args.compare, args.column))
    if args.table:
        print("\n".join(table_rows(results, args.columns, args.per_run)))
    if args.plot:
        if not results.exists():
            raise UserError(f"no run of {args.grid} has finished yet ({results} is missing)")
        print(f"wrote {plot_test_errors(errors_by_recipe(results), args.plot)}")
    if args.table or args.plot or args.compare:
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # acts as Ctrl-C does
    try:
        sweep(args.grid, results, args.runs_dir, args.data_dir, args.list)
    except KeyboardInterrupt:
        message = "interrupted: finished runs are kept; run the sweep again to resume"
        raise UserError(message) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def sweep(grid: Path, results: Path, runs_dir: Path, data_dir: str, listing: bool) -> None:
    while (run := next_run(grid, results, runs_dir, listing)) is not None:
        folder = runs_dir / run["name"]
        code = train(run, folder, data_dir)
        if code != 0 or not finished(folder):
            raise UserError(
                f"run {run['name']} stopped early (exit {code}); run the sweep again to resume it"
            )
        scores = evaluation(run, folder, data_dir)
        write_jsonl([*read_results(results), summary(run, folder, scores)], results)


if __name__ == "__main__":
    exit_on_user_error(main)
