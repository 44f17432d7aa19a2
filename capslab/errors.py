"""What the scripts tell the user: one-line errors (a problem the user can fix never shows a
traceback), and log and warning lines, printed by the first process only under torchrun."""

import os
import signal
import sys
import tempfile
from pathlib import Path


def exit_on_ctrl_c_while_loading(module_name: str) -> None:
    """Called first by each script, with its __name__: until exit_on_user_error runs main(),
    Ctrl-C ends the script at once with one line and status 130. A KeyboardInterrupt raised
    there would land inside some library's import (torch takes seconds), print its traceback,
    and could leave the library half loaded for the interpreter's exit. Imported as a module
    (by the tests), the script changes nothing."""
    if module_name == "__main__" and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, exit_interrupted)  # ignored stays ignored (`cmd &`)


def exit_interrupted(signum, frame) -> None:
    sys.stderr.write("error: interrupted\n")
    sys.stderr.flush()
    os._exit(130)  # main() has not begun: nothing is written, and no library half loaded exits


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0  # torchrun sets RANK; a plain run is rank 0


def log(*args, **kwargs) -> None:
    """print, on rank 0 only."""
    if is_main_process():
        print(*args, **kwargs)


def warn(message: str) -> None:
    """A "warning: ..." line on stderr, as every script prints its warnings (rank 0 only)."""
    log(f"warning: {message}", file=sys.stderr, flush=True)


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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised wherever the script is, as Ctrl-C raises KeyboardInterrupt: files being
    written are cleaned up on the way out (atomic.write_atomically) rather than left half done."""


def raise_terminated(signum, frame):
    raise Terminated


def exit_on_user_error(main):
    """Run `main()`, turning a UserError into `error: ...` on stderr and exit status 2, a
    Ctrl-C into `error: interrupted` and status 130, and SIGTERM into `error: terminated` and
    status 143 (where the script has no handler of its own for them, as train.py and sweep.py
    have; a signal the caller ignores stays ignored).

    A reader that stops early (`... | head`) ends the script quietly with status 1, as the
    Python documentation's note on SIGPIPE recommends: stdout goes to devnull so that the
    interpreter's final flush cannot fail a second time."""
    if signal.getsignal(signal.SIGINT) is exit_interrupted:  # loaded: Ctrl-C may now unwind
        signal.signal(signal.SIGINT, signal.default_int_handler)
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_DFL:  # not where the caller ignores it or has its own
        signal.signal(signal.SIGTERM, raise_terminated)
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except Terminated:
        print("error: terminated", file=sys.stderr)
        sys.exit(143)  # 128 + SIGTERM, as a shell reports it
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    finally:
        signal.signal(signal.SIGTERM, previous)


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
