"""The one error type for bad input: the CLI prints its message as one line and exits non-zero."""


class UserError(Exception):
    """Bad input (config, option, data file, model name). The message names the culprit."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, for one-line errors."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
