"""User-facing errors: one line on stderr and a non-zero exit, never a traceback."""

import functools
import sys

USAGE = 2  # bad flags or arguments
DATA = 1  # bad or missing data, checkpoints, outputs


class UserError(Exception):
    """A mistake the user can fix; `exit_code` is USAGE or DATA."""

    def __init__(self, message, exit_code=DATA):
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(UserError):
    def __init__(self, message):
        super().__init__(message, USAGE)


def cli(main):
    """Decorate a script's main(): UserError -> `error: ...` on stderr and its exit code."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            prog = sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "mvp_diff"
            print(f"{prog}: error: {err}", file=sys.stderr)
            sys.exit(err.exit_code)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
