"""The one error type the CLI turns into a single stderr line and exit code 2."""


class OtfuseError(Exception):
    """Bad usage or bad input: reported as one line, exit code 2, no traceback."""

    exit_code = 2
