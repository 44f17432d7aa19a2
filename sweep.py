"""Train a grid of runs one at a time, resumably, and keep one JSON line per finished run.

    python sweep.py results/grids/recipe.json --data-dir ../shared/data
    python sweep.py results/grids/recipe.json --list        # what is done, running, to do

A grid file is a JSON list of {"name": ..., "flags": [...]} for train.py. Each run trains in
runs/sweep/NAME (or --runs-dir); a finished run is skipped, an interrupted one resumed. When a
run ends, its final and best epochs go as one line to the results file named in the grid file
beside it (GRID.results.jsonl). Ctrl-C stops the current run resumably and ends the sweep.
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
    args = parser.parse_args(argv)
    grid = read_grid(args.grid)
    results = args.grid.with_suffix(".results.jsonl")
    for run in grid:
        folder = args.runs_dir / run["name"]
        if run["name"] in finished_names(results):
            print(f"[{run['name']}] done")
            continue
        if args.list:
            print(f"[{run['name']}] {len(records(folder))} epochs logged")
            continue
        code = train(run, folder, args.data_dir)
        if code != 0:
            raise UserError(
                f"run {run['name']} stopped (exit {code}); run the sweep again to resume it"
            )
        with open(results, "a") as file:
            file.write(json.dumps(summary(run, folder)) + "\n")


if __name__ == "__main__":
    exit_on_user_error(main)
