"""Calling a function in a child Python that can be stopped.

A parser stuck for minutes inside one C call (a regular expression backtracking) cannot
be interrupted by trial's timeout, which only applies to Deferreds, nor by a signal: the
tests of R-3's crafted input call it in a child, killed when its time is up.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.trial import unittest

REPO = Path(__file__).resolve().parent.parent
_CALL = ("import importlib, pickle, sys; module, name, args = pickle.load(sys.stdin.buffer);"
         " getattr(importlib.import_module(module), name)(*args)")


def assert_finishes(test: unittest.TestCase, function: Callable[..., Any], *args: Any,
                    seconds: float = 20.0) -> None:
    """Fail `test` unless `function(*args)` (a module-level function; picklable args),
    called by a child Python, ends within `seconds`: a hang guard with a wide margin,
    not a speed target."""
    call = pickle.dumps((function.__module__, function.__qualname__, args))
    try:
        subprocess.run([sys.executable, "-c", _CALL], input=call, cwd=REPO, check=True,
                       timeout=seconds, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    except subprocess.TimeoutExpired:
        test.fail(f"{function.__qualname__} still running after {seconds} s")
    except subprocess.CalledProcessError as e:
        test.fail(f"{function.__qualname__} failed: {e.stderr.decode(errors='replace')}")
