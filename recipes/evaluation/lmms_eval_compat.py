"""Compatibility of lmms-eval 0.7.3 with the pinned stack.

lmms-eval's ``simple_evaluate`` patches ``filelock._api.FileLockMeta`` (to make dataset file locks re-entrant).
filelock 4 moved that class to ``filelock._core``, so the import fails with
``ModuleNotFoundError: No module named 'filelock._api'`` before any task runs. ``ensure_filelock_api`` registers an
alias module exposing the same names; it does nothing when ``filelock._api`` exists (filelock 3).
"""

from __future__ import annotations

import importlib
import sys
import types


def ensure_filelock_api() -> None:
    try:
        importlib.import_module("filelock._api")
        return
    except ModuleNotFoundError:
        pass
    core = importlib.import_module("filelock._core")
    alias = types.ModuleType("filelock._api")
    alias.__doc__ = "filelock._core under its filelock 3 name (see recipes.evaluation.lmms_eval_compat)."
    alias.FileLockMeta = core.FileLockMeta
    alias.BaseFileLock = core.BaseFileLock
    alias._UNSET_FILE_MODE = core.UNSET_FILE_MODE
    sys.modules["filelock._api"] = alias
