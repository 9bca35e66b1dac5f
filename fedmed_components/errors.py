"""Errors a user must fix, which `fedmed` prints as one line (no traceback).

`document.InputError` covers bad input files (it names the file and line); `ModelError`
covers the model side: a missing offline model package, a model id that is neither
built in, a folder nor reachable, an adapter made for another base model.
"""

from __future__ import annotations


class ModelError(RuntimeError):
    """A base model or adapter that cannot be used; the message says what to do."""
