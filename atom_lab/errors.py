"""User errors: bad input the researcher can fix, reported as one line without a traceback.

Anything raised as one of `user_error_types()` is printed by run.py as a single line naming the key
and the fix, with exit code 2. Every other exception is a bug and keeps its traceback. Setting the
environment variable ATOM_LAB_DEBUG=1 (or `debug=true` on the command line) shows the traceback of
user errors too.
"""
from __future__ import annotations

import os

from omegaconf.errors import MissingMandatoryValue

from atom_lab.config import ConfigError
from atom_lab.cuda import KernelBackendUnavailable

DEBUG_ENV = "ATOM_LAB_DEBUG"
USER_ERROR_EXIT_CODE = 2


class HarnessError(ValueError):
    """A harness setting that cannot work (eval dataset, task name, device, ...)."""


def user_error_types() -> tuple[type[BaseException], ...]:
    # imported here: data.py and models.py pull in torch/transformers, which run.py's
    # command-line check does not need
    from atom_lab.data import DataError

    types: list[type[BaseException]] = [ConfigError, DataError, HarnessError,
                                        KernelBackendUnavailable, MissingMandatoryValue]
    for module, name in (("atom_lab.models", "ModelLoadError"),
                         ("atom_lab.kernel_ops", "KernelShapeError")):
        try:
            types.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(types)


def is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, user_error_types())


def debug_requested(cfg_debug: bool = False) -> bool:
    return bool(cfg_debug) or os.environ.get(DEBUG_ENV, "") not in ("", "0", "false")


def one_line(exc: BaseException) -> str:
    """The error as one line: `error: <message>` (multi-line messages are joined)."""
    if isinstance(exc, MissingMandatoryValue):
        key = getattr(exc, "full_key", "") or "a key"
        message = f"{key} is required and has no value: set {key}=... on the command line"
    else:
        message = str(exc) or exc.__class__.__name__
    message = " ".join(part.strip() for part in message.splitlines() if part.strip())
    return f"error: {message}"


def with_debug_hint(line: str) -> str:
    return f"{line} (set {DEBUG_ENV}=1 or debug=true for the traceback)"
