"""One-line errors for the scripts: a problem the user can fix never shows a traceback."""

import sys


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, wrong checkpoint): one line."""


def exit_on_user_error(main):
    """Run `main()`, turning a UserError into `error: ...` on stderr and exit status 2."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
