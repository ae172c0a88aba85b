"""The one exception type for mistakes a user can make."""


class AutopruneError(Exception):
    """A problem the user can fix: bad name, bad budget, missing file, mismatched study.

    The message says what was wrong and what to do; the CLI prints it on one line
    and exits non-zero without a traceback.
    """


def one_line(err: BaseException) -> str:
    """An error's message on one line; for a database error, the driver's own message (``err.orig``).

    Messages from other libraries (SQLAlchemy, a user's module) can span several lines.
    """
    return " ".join(str(getattr(err, "orig", None) or err).split())


def why(err: BaseException) -> str:
    """An error of the user's code in one line (a SyntaxError's text names the file and line)."""
    return f"{type(err).__name__}: {one_line(err)}"
