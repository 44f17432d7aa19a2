"""One-line errors for the scripts: a problem the user can fix never shows a traceback."""

import sys


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, wrong checkpoint): one line."""


def first_line(error: Exception) -> str:
    """An exception's message cut to its first line (its type name when it has none)."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def exit_on_user_error(main):
    """Run `main()`, turning a UserError into `error: ...` on stderr and exit status 2."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
