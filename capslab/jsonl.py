"""JSON Lines files (metrics.jsonl, GRID.results.jsonl): one JSON object a line, read with a
one-line error that names the file and the line, written atomically, so a crash mid-write
leaves the previous file whole; and the epoch record validation chose. No torch: the tools
that only read records (time_to_accuracy.py, tools/bench_against.py) start at once."""

import json
import math
from collections.abc import Callable
from pathlib import Path

from capslab.atomic import write_atomically
from capslab.errors import UserError, first_line

# What is wrong with one record (None: nothing), for the reader that knows its fields.
RecordCheck = Callable[[dict], str | None]


def read_jsonl(path: Path, what: str, check: RecordCheck | None = None) -> list[dict]:
    """One record per non-blank line. A line that is not JSON, not a JSON object, or that
    `check` finds wrong, stops the reading with the file, the line number and the problem."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, ValueError) as error:  # ValueError: not even text
        raise UserError(f"{path} is not a readable {what} ({first_line(error)})") from error
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise UserError(
                f"{path} is not a readable {what} (line {number}: {first_line(error)})"
            ) from error
        problem = record_problem(record, check)
        if problem:
            raise UserError(f"{path} is not a readable {what} (line {number}: {problem})")
        records.append(record)
    return records


def record_problem(record, check: RecordCheck | None = None) -> str | None:
    """What is wrong with one record: not an object, or what `check` says."""
    if not isinstance(record, dict):
        return f"{json.dumps(record)[:40]} is a {json_type(record)}, not a JSON object"
    return check(record) if check else None


def json_type(value) -> str:
    """The JSON name of a parsed value's type, as a user reading the file knows it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def is_number(value) -> bool:
    """A JSON number (NaN included), not a boolean or a string that looks like one."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def number_problem(record: dict, keys, where: str = "") -> str | None:
    """The first of `keys` that the record holds as something other than a number."""
    for key in keys:
        if key in record and not is_number(record[key]):
            return f"{where}{key!r} is {json.dumps(record[key])[:40]}, not a number"
    return None


def chosen_by_validation(metrics: list[dict]) -> dict | None:
    """The epoch record best.pt holds: the first with the highest validation accuracy, as
    `save_epoch` keeps only a strict improvement, which a NaN never is (None for a run
    without validation)."""
    scored = (r for r in metrics if "val_acc" in r and math.isfinite(r["val_acc"]))
    return max(scored, key=lambda r: r["val_acc"], default=None)


def write_jsonl(records: list[dict], path: Path) -> None:
    """Rewrite the whole file through a temporary one: never a torn last line."""
    text = "".join(json.dumps(record) + "\n" for record in records)
    write_atomically(path, lambda temporary: temporary.write_text(text))
