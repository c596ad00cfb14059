"""The one error type for bad input: the CLI prints its message as one line and exits non-zero."""

import sys


class UserError(Exception):
    """Bad input (config, option, data file, model name). The message names the culprit."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, for one-line errors."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def say(line: str) -> None:
    """Print one line to stderr in a single write: ranks of one launch share the pipe, unbuffered
    (print writes the newline apart, so two ranks' lines ran together), and a pipe write under
    PIPE_BUF bytes is never interleaved with another's."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
