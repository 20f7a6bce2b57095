"""Errors the CLIs map to exit codes: bad input is 2, everything unexpected is 1."""

import importlib
from types import ModuleType


class InputError(ValueError):
    """Bad input: the message names the field or file at fault and how to fix it."""


class UnservableRecipeError(InputError):
    """A recipe vLLM cannot serve, asked for without --allow-unservable."""


def require(module: str, needed_for: str, install: str) -> ModuleType:
    """`module`, imported; when it is missing, bad input saying what needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise InputError(f"{needed_for} needs {module} ({install}; import failed: {exc})") from exc
