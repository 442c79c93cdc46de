"""Errors we raise on purpose: a stage prints their message as one line, without a traceback.

Anything else (a shape bug, out of memory) keeps its traceback (stages/common.run). Kept apart
and free of imports so that every module can use it without pulling in torch or the IQA code.
"""


class ExpectedError(Exception):
    """Bad input that the message fully explains: a parameter, a file or a command-line value."""


class UsageError(ExpectedError, ValueError):
    """A command-line value is not one the stage accepts (e.g. an unknown --strategy)."""


class TrainingError(ExpectedError, RuntimeError):
    """Training cannot go on (diverged, or inputs inconsistent with the strategy or the device)."""
