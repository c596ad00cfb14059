"""The one error type for bad input: the CLI prints its message as one line and exits non-zero."""


class UserError(Exception):
    """Bad input (config, option, data file, model name). The message names the culprit."""
