"""Run a stage script's ``main`` as on a slow disk: one ``tool.fileio`` function sleeps after each
call, so that the worker processes that call it are busy when the test acts.

    python tests/helpers/slow_run.py FUNCTION SECONDS MODULE [ARG ...]

e.g. ``read_image 2 train_SB --voc12_root ...``. A call that raises (a corrupt image) raises at
once. The function is replaced before MODULE is imported, so that the names MODULE and its
imports bind are the slow one.
"""
from __future__ import annotations

import functools
import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tool import fileio  # noqa: E402


def slowed(function, seconds: float):
    @functools.wraps(function)
    def slow(*args, **kwargs):
        result = function(*args, **kwargs)
        time.sleep(seconds)
        return result

    return slow


if __name__ == "__main__":
    name, seconds, module = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    setattr(fileio, name, slowed(getattr(fileio, name), seconds))
    importlib.import_module(module).main(sys.argv[4:])
