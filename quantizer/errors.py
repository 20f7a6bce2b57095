"""Errors the CLIs map to exit codes: bad input is 2, everything unexpected is 1."""


class InputError(ValueError):
    """Bad input: the message names the field or file at fault and how to fix it."""


class UnservableRecipeError(InputError):
    """A recipe vLLM cannot serve, asked for without --allow-unservable."""
