"""One-line errors for the scripts: a problem the user can fix never shows a traceback."""

import os
import sys
import tempfile
from pathlib import Path


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, wrong checkpoint): one line."""


def flag_name(setting: str) -> str:
    """The command-line flag of a setting: batch_size -> --batch-size."""
    return "--" + setting.replace("_", "-")


def counted(count: int, noun: str) -> str:
    """'1 file', '2 files': a count with its noun, singular or plural (nouns ending in s)."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def first_line(error: Exception) -> str:
    """An exception's message cut to its first line (its type name when it has none)."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def exit_on_user_error(main):
    """Run `main()`, turning a UserError into `error: ...` on stderr and exit status 2, and a
    Ctrl-C into `error: interrupted` and status 130.

    A reader that stops early (`... | head`) ends the script quietly with status 1, as the
    Python documentation's note on SIGPIPE recommends: stdout goes to devnull so that the
    interpreter's final flush cannot fail a second time."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C where no handler of the script's own catches it
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT, as a shell reports it
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def check_new_output_folder(folder: Path) -> None:
    """A folder a tool fills from scratch must be new or empty, and not a file."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file, not a folder")
    if folder.exists() and any(folder.iterdir()):
        raise UserError(f"{folder} is not empty: choose a new folder")


def make_output_folder(folder: Path, flag: str) -> None:
    """Create the folder a flag names for output files, and check that it takes files, before
    any work is done for them."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"{flag} {folder} cannot be created ({error.strerror})") from error
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise UserError(f"{flag} {folder} cannot be written ({error.strerror})") from error
