"""The torchrun worker: ``torchrun ... -m schashformer.worker cluster INPUT --out DIR ...``.

Each rank parses the ``schashformer cluster`` command line and runs its part of the fit
(:func:`schashformer.distributed.run`); ``schashformer cluster ... --nproc N`` starts these
workers on one machine (:func:`schashformer.distributed.launch`).
"""

from __future__ import annotations

import logging
import os
import sys

from .cli import build_parser
from .distributed import ERROR_FILE_ENV, report_error, run
from .errors import SCHashFormerError


def main(argv: list[str] | None = None) -> int:
    """Entry of ``torchrun -m schashformer.worker cluster INPUT --out DIR ...``; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet or int(os.environ.get("RANK", 0)) else logging.INFO,
                        format="%(message)s")
    if args.command != "cluster":
        print("schashformer: error: only 'cluster' runs distributed", file=sys.stderr)
        return 2
    try:
        return run(args)
    except SCHashFormerError as exc:  # raised before the group existed (not launched by torchrun ...)
        report_error(exc)
        return 0 if os.environ.get(ERROR_FILE_ENV) else 2


def exit_now(code: int) -> None:
    """Flush what the rank wrote and end the process without the interpreter's teardown.

    Why: gloo's worker and transport threads can still be joinable while the interpreter
    destroys C++ objects at exit, and libstdc++ then aborts the rank ("terminate called
    without an active exception", SIGABRT; once in 2-process CI runs, not reproduced in 35
    runs here); torchrun reports that as a failed run. By this point every file the rank
    wrote is closed and the process group is destroyed, so skipping the teardown loses nothing.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
