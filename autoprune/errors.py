"""The one exception type for mistakes a user can make."""


class AutopruneError(Exception):
    """A problem the user can fix: bad name, bad budget, missing file, mismatched study.

    The message says what was wrong and what to do; the CLI prints it on one line
    and exits non-zero without a traceback.
    """
