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
import math
from pathlib import Path

from capslab.errors import UserError, exit_on_user_error
from capslab.jsonl import (
    chosen_by_validation,
    is_number,
    number_problem,
    read_jsonl,
    record_problem,
)

THRESHOLDS = (99.0, 99.5, 99.6, 99.7)
NUMBERS = ("test_acc", "val_acc", "seconds", "wall_seconds")  # what the table computes with


def epoch_record_problem(record: dict) -> str | None:
    """What in one epoch record would make the table wrong or fail (None: nothing)."""
    if "epoch" not in record:
        return "the record has no 'epoch'"
    if not is_number(record["epoch"]):
        return f"'epoch' is {json.dumps(record['epoch'])[:40]}, not a number"
    machine = record.get("machine", "")
    if not isinstance(machine, str):
        return f"'machine' is {json.dumps(machine)[:40]}, not a string"
    return number_problem(record, NUMBERS)


def read_log(path: Path) -> list[dict]:
    """A run folder, its metrics.jsonl or a checkpoint (.pt) -> the epoch records."""
    if path.suffix != ".pt":
        log = path / "metrics.jsonl" if path.is_dir() else path
        return read_jsonl(log, "metrics log", epoch_record_problem)
    from capslab.checkpoint import load_checkpoint  # here: torch's 2 s import, for .pt alone

    metrics = load_checkpoint(path).get("metrics", [])  # a list of dicts: load_checkpoint checks
    for number, record in enumerate(metrics, start=1):
        problem = record_problem(record, epoch_record_problem)
        if problem:
            raise UserError(f"{path} holds no readable log (epoch record {number}: {problem})")
    return metrics


def accuracy_threshold(value: float) -> float:
    """A --thresholds value: a test accuracy in %, so a finite number from 0 to 100."""
    if not (math.isfinite(value) and 0 <= value <= 100):
        raise UserError(f"--thresholds {value} is not a test accuracy in % (0 to 100)")
    return value


def without_nan(value):
    """The value with each NaN or infinity as None: JSON has no NaN (JSON's null instead)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: without_nan(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_nan(item) for item in value]
    return value


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
    clock, mark = reached["seconds"], ""
    if clock is None or not math.isfinite(clock):
        clock, mark = reached["train_seconds"], "train "
    if not math.isfinite(clock):  # a NaN time in the log: the epoch alone
        return f"ep {reached['epoch']}"
    minutes, seconds = divmod(round(clock), 60)
    return f"ep {reached['epoch']} {mark}{minutes}:{seconds:02d}"


def chosen_cell(chosen: dict | None) -> str:
    """'99.59% ep 27': the test accuracy of the epoch validation chose ('-' if none)."""
    if chosen is None:
        return "-"
    test = "untested" if chosen["test_acc"] is None else f"{chosen['test_acc']:.2f}%"
    return f"{test} ep {chosen['epoch']}"


def threshold_label(threshold: float) -> str:
    """'99.0%', or every digit the user gave: '99.15%' (rounded, two columns could share a name)."""
    return f"{threshold:.1f}%" if threshold == round(threshold, 1) else f"{threshold:g}%"


def print_table(rows: list[dict], thresholds) -> None:
    width = max(len("run"), *(len(row["run"]) for row in rows))
    header = (
        f"{'run':<{width}}  "
        + "".join(f"{threshold_label(t):>20}" for t in thresholds)
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
        help=f"test accuracies in %% (default: {' '.join(map(str, THRESHOLDS))})",
    )
    parser.add_argument(
        "--json", action="store_true", help="one JSON object per run (default: a table)"
    )
    args = parser.parse_args(argv)
    thresholds = [accuracy_threshold(value) for value in args.thresholds]
    rows = []
    for path in args.runs:
        name = path.name if path.is_dir() else f"{path.parent.name}/{path.name}"
        rows.append(summarize(name, read_log(path), thresholds))
    if args.json:
        print("\n".join(json.dumps(without_nan(row), allow_nan=False) for row in rows))
    else:
        print_table(rows, thresholds)


if __name__ == "__main__":
    exit_on_user_error(main)
