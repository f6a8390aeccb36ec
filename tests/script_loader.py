"""Load a command-line script from ``scripts/`` as a module, for tests of its functions (no sys.path edits), or run it
in this process as the command line would."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str, module_name: str | None = None) -> ModuleType:
    """``scripts/<name>.py`` as a fresh module registered as ``module_name`` (default ``<name>_under_test``)."""
    module_name = module_name or f"{name}_under_test"
    spec = importlib.util.spec_from_file_location(module_name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look classes up through their module
    spec.loader.exec_module(module)
    return module


@dataclass
class Finished:
    """What a script run in this process left: its exit status and what it printed."""

    returncode: int
    stdout: str
    stderr: str


def run_script_in_process(name: str, argv: list[str], capsys, cwd: Path | None = None) -> Finished:
    """``python scripts/<name>.py *argv`` in this process, through the script's own ``run_cli`` (one-line errors,
    exit codes), from ``cwd``: the same contract a subprocess checks, without its ~6 s of importing torch again.
    An exception that escapes ``run_cli`` (a traceback in a real run) fails the calling test."""
    import os

    script = load_script(name)
    from cli import run_cli

    capsys.readouterr()  # drop what the test printed before
    previous = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        run_cli(lambda: script.main(list(argv)))  # always ends in sys.exit
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        os.chdir(previous)
    captured = capsys.readouterr()
    return Finished(code, captured.out, captured.err)


def sigint_default() -> None:
    """``preexec_fn`` for a child that a test interrupts: SIGINT to its default, as in an interactive shell. A suite
    launched in the background (``make test &``) inherits SIGINT ignored, and Python then installs no
    KeyboardInterrupt handler."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
