"""Ctrl-C and SIGTERM on the command line: one line instead of a traceback, exit 130 / 143.

While :func:`signals_raise` is active (the command line's ``main``), SIGTERM raises
:class:`Terminated`, a ``KeyboardInterrupt``, so that both signals unwind through the same
clean-up as Ctrl-C (the staging folder is removed, the lock released, the checkpoint kept).
:func:`message` then names where training stopped, from the checkpoint kept in
``OUT/.checkpoint``, and the command that resumes it.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import threading
from pathlib import Path

import torch

EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM  # 130, 143, as a shell reports them

# checkpoint phases (schashformer.checkpoint.PHASES) in words
STAGES = {"stage1": "stage 1 (hashing)", "stage1_done": "stage 1 (hashing)",
          "pretrain": "stage 2 pre-training", "pretrain_done": "stage 2 pre-training",
          "centres": "stage 2 centre placement", "cluster": "stage 2 clustering", "done": "training"}
MID_LOOP = ("stage1", "pretrain", "cluster")  # checkpoints inside a training loop, at a step


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt."""

    signum = signal.SIGTERM


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def signals_raise():
    """SIGTERM raises :class:`Terminated` inside the block (main thread only); the old handler is restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_code(exc: BaseException) -> int:
    return EXIT_SIGTERM if isinstance(exc, Terminated) else EXIT_SIGINT


def checkpoint_position(checkpoint_dir: Path) -> tuple[str, int] | None:
    """(phase, step) of the checkpoint in ``checkpoint_dir``, or None when there is none (or it is unreadable)."""
    path = Path(checkpoint_dir) / "checkpoint.pt"
    if not path.is_file():
        return None
    try:

        state = torch.load(path, map_location="cpu", weights_only=True)
        return str(state["phase"]), int(state["step"])
    except Exception:  # noqa: BLE001  (torch raises many types; never fail while reporting)
        return None


def resume_command(argv: list[str]) -> str:
    """The command line ``argv`` with ``--resume`` added (kept once)."""
    args = list(argv)
    if "--resume" not in args:
        args.append("--resume")
    return "schashformer " + shlex.join(args)


def message(exc: BaseException, argv: list[str], checkpoint_dir: Path | None) -> str:
    """One line: where training stopped and how to resume."""
    what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
    where = None if checkpoint_dir is None else checkpoint_position(checkpoint_dir)
    if where is None:
        return f"{what} before the first checkpoint; nothing to resume, run the command again"
    phase, step = where
    at = f"at {STAGES.get(phase, phase)} step {step}" if phase in MID_LOOP else f"after {STAGES.get(phase, phase)}"
    return f"{what} {at} (last checkpoint, kept in {checkpoint_dir}); resume with: {resume_command(argv)}"
