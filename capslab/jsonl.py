"""JSON Lines files (metrics.jsonl, GRID.results.jsonl): read with a one-line error, written
atomically, so a crash mid-write leaves the previous file whole."""

import json
import os
from pathlib import Path

from capslab.checkpoint import temporary_path
from capslab.errors import UserError, first_line


def read_jsonl(path: Path, what: str) -> list[dict]:
    """One record per non-blank line; a line that is not JSON names the file and its number."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, ValueError) as error:  # ValueError: not even text
        raise UserError(f"{path} is not a readable {what} ({first_line(error)})") from error
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as error:
            raise UserError(
                f"{path} is not a readable {what} (line {number}: {first_line(error)})"
            ) from error
    return records


def write_jsonl(records: list[dict], path: Path) -> None:
    """Rewrite the whole file through a temporary one: never a torn last line."""
    temporary = temporary_path(path)
    temporary.write_text("".join(json.dumps(record) + "\n" for record in records))
    os.replace(temporary, path)
