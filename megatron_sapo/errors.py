"""The base class of the project's input errors.

It sits at the bottom of the package and imports nothing of it, so any module (``config.py``
included) can raise it.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input, named by the message: a file, a field, a config value, a tensor or its shape.

    The ``megatron-sapo`` command prints it in one line and exits with status 2 (``cli.py``);
    a plain ``ValueError`` is a bug and keeps its traceback. Subclassing ``ValueError`` keeps
    ``except ValueError`` callers working.
    """


__all__ = ["InputError"]
