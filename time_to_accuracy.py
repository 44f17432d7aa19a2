"""When did a run first reach each accuracy? Epoch and wall-clock time, from metrics.jsonl.

    python time_to_accuracy.py runs/sweep/*/              # one row per run folder
    python time_to_accuracy.py runs/a/metrics.jsonl --thresholds 99.0 99.5 --json
    python time_to_accuracy.py checkpoints/capsnet_mnist.pt  # the log a checkpoint carries

The time is the run's wall clock (`wall_seconds`: training and evaluation, counted from
launch and continued across resumes). Logs written before that clock existed show the
training time summed over epochs instead, marked "train": evaluation is not in it. The
accuracy is the test accuracy of the weights validation chose that epoch. "chosen" is the
epoch best.pt holds (the highest validation accuracy) and its test accuracy. Times from
different machines do not compare: the last column names the machine(s) a run trained on.
"""

import argparse
import json
from pathlib import Path

from capslab.checkpoint import load_checkpoint
from capslab.errors import exit_on_user_error
from capslab.jsonl import read_jsonl
from capslab.training import chosen_by_validation

THRESHOLDS = (99.0, 99.5, 99.6, 99.7)


def read_log(path: Path) -> list[dict]:
    """A run folder, its metrics.jsonl or a checkpoint (.pt) -> the epoch records."""
    if path.suffix == ".pt":
        return load_checkpoint(path).get("metrics", [])
    log = path / "metrics.jsonl" if path.is_dir() else path
    return read_jsonl(log, "metrics log")


def first_reached(records: list[dict], threshold: float) -> dict | None:
    """The first record whose test accuracy is at least `threshold`, or None."""
    return next((r for r in records if r.get("test_acc", -1) >= threshold), None)


def summarize(name: str, records: list[dict], thresholds) -> dict:
    tested = [r for r in records if "test_acc" in r]
    chosen = chosen_by_validation(records)
    reached = {}
    for threshold in thresholds:
        record = first_reached(records, threshold)
        reached[str(threshold)] = record and {
            "epoch": record["epoch"],
            "seconds": record.get("wall_seconds"),
            "train_seconds": sum(r.get("seconds", 0) for r in records[: records.index(record) + 1]),
        }
    return {
        "run": name,
        "epochs": len(records),
        "final_test_acc": tested[-1]["test_acc"] if tested else None,
        "chosen": chosen and {key: chosen.get(key) for key in ("epoch", "val_acc", "test_acc")},
        "wall_seconds": records[-1].get("wall_seconds") if records else None,
        "reached": reached,
        "machines": sorted({r["machine"] for r in records if "machine" in r}),  # newer logs
    }


def cell(reached: dict | None) -> str:
    if reached is None:
        return "-"
    if reached["seconds"] is None:
        minutes, seconds = divmod(round(reached["train_seconds"]), 60)
        return f"ep {reached['epoch']} train {minutes}:{seconds:02d}"
    minutes, seconds = divmod(round(reached["seconds"]), 60)
    return f"ep {reached['epoch']} {minutes}:{seconds:02d}"


def chosen_cell(chosen: dict | None) -> str:
    """'99.59% ep 27': the test accuracy of the epoch validation chose ('-' if none)."""
    if chosen is None:
        return "-"
    test = "untested" if chosen["test_acc"] is None else f"{chosen['test_acc']:.2f}%"
    return f"{test} ep {chosen['epoch']}"


def print_table(rows: list[dict], thresholds) -> None:
    width = max(len("run"), *(len(row["run"]) for row in rows))
    header = (
        f"{'run':<{width}}  "
        + "".join(f"{f'{t:.1f}%':>20}" for t in thresholds)
        + "     final         chosen  trained on"
    )
    print(header)
    for row in rows:
        final = f"{row['final_test_acc']:.2f}%" if row["final_test_acc"] is not None else "-"
        cells = "".join(f"{cell(row['reached'][str(t)]):>20}" for t in thresholds)
        machines = ", ".join(row["machines"]) or "-"
        chosen = chosen_cell(row["chosen"])
        print(f"{row['run']:<{width}}  {cells}{final:>10}{chosen:>15}  {machines}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "runs", nargs="+", type=Path, help="run folders, metrics.jsonl files or checkpoints"
    )
    parser.add_argument(
        "--thresholds",
        type=float,
        nargs="+",
        default=THRESHOLDS,
        help="test accuracies in %% (default: 99.0 99.5 99.6 99.7)",
    )
    parser.add_argument(
        "--json", action="store_true", help="one JSON object per run (default: a table)"
    )
    args = parser.parse_args(argv)
    rows = []
    for path in args.runs:
        name = path.name if path.is_dir() else f"{path.parent.name}/{path.name}"
        rows.append(summarize(name, read_log(path), args.thresholds))
    if args.json:
        print("\n".join(json.dumps(row) for row in rows))
    else:
        print_table(rows, args.thresholds)


if __name__ == "__main__":
    exit_on_user_error(main)
