"""Train a grid of runs one at a time, resumably, and keep one JSON line per finished run.

    python sweep.py results/grids/recipe.json --data-dir ../shared/data
    python sweep.py results/grids/recipe.json --list        # what is done, running, to do
    python sweep.py results/grids/recipe.json --table       # the finished runs as a Markdown table

A grid file is a JSON list of {"name": ..., "flags": [...]} for train.py. Each run trains in
runs/sweep/NAME (or --runs-dir); a finished run is skipped, an interrupted one resumed. When a
run ends, its final and best epochs go as one line to the results file named in the grid file
beside it (GRID.results.jsonl). The grid file is read again before each run, so runs can be
added or reordered while a sweep is going. Ctrl-C stops the current run resumably and ends
the sweep.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from errors import UserError, exit_on_user_error


def read_grid(path: Path) -> list[dict]:
    try:
        grid = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{path} is not a readable grid file ({error})") from error
    if not isinstance(grid, list) or not all({"name", "flags"} <= set(run) for run in grid):
        raise UserError(f"{path} must hold a JSON list of {{'name': ..., 'flags': [...]}} objects")
    return grid


def records(folder: Path) -> list[dict]:
    log = folder / "metrics.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def finished_names(results: Path) -> set[str]:
    if not results.exists():
        return set()
    return {json.loads(line)["name"] for line in results.read_text().splitlines()}


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
    return subprocess.run(command).returncode


def summary(run: dict, folder: Path) -> dict:
    log = records(folder)
    best = max((r for r in log if "val_acc" in r), key=lambda r: r["val_acc"], default=log[-1])
    return {
        "name": run["name"],
        "flags": run["flags"],
        "final": log[-1],
        "best_by_val": best,
        "log": log,
    }


def table_rows(results: Path) -> list[str]:
    """One Markdown row per finished run: the final epoch's scores and the run's wall clock."""
    rows = [
        "| run | val | test | test, raw weights | test, averaged | wall |",
        "|---|---|---|---|---|---|",
    ]
    for line in results.read_text().splitlines() if results.exists() else []:
        run = json.loads(line)
        final = run["final"]
        scores = [final.get(key) for key in ("val_acc", "test_acc", "raw_test_acc", "ema_test_acc")]
        cells = [f"{value:.2f}%" if value is not None else "-" for value in scores]
        wall = final.get("wall_seconds")
        rows.append(
            f"| {run['name']} | {' | '.join(cells)} | {f'{wall / 60:.1f} min' if wall else '-'} |"
        )
    return rows


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
    parser.add_argument("--data-dir", default="data", help="dataset root (default: data)")
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
        "--table", action="store_true", help="print the finished runs as a Markdown table"
    )
    args = parser.parse_args(argv)
    results = args.grid.with_suffix(".results.jsonl")
    if args.table:
        print("\n".join(table_rows(results)))
        return
    while (run := next_run(args.grid, results, args.runs_dir, args.list)) is not None:
        folder = args.runs_dir / run["name"]
        code = train(run, folder, args.data_dir)
        if code != 0:
            raise UserError(
                f"run {run['name']} stopped (exit {code}); run the sweep again to resume it"
            )
        with open(results, "a") as file:
            file.write(json.dumps(summary(run, folder)) + "\n")


if __name__ == "__main__":
    exit_on_user_error(main)
