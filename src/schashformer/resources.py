"""Memory guard: estimate what reading or fitting will need and stop early when it cannot fit.

A run that would exhaust memory is otherwise killed by the kernel's OOM killer after minutes or
hours, with no message. :func:`check_fits` compares an estimate with the memory available now
(``MemAvailable`` in ``/proc/meminfo``, capped by a cgroup v2/v1 memory limit, as in containers
and batch jobs) and raises :class:`~schashformer.errors.ResourceError` saying how much is needed
and how much is available. Where the available memory cannot be read (not Linux), nothing is
checked. Estimates are deliberately low (the buffers the step certainly holds at once), so that a
run that fits is never refused; a refused run would certainly not have fitted.
"""

from __future__ import annotations

import logging
import resource
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .errors import ResourceError

log = logging.getLogger(__name__)
CSR_BYTES_PER_VALUE = 8  # float32 value + int32 column index


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def available_bytes() -> int | None:
    """Memory this process can still allocate, in bytes, or None where it cannot be read."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:  # v1 writes a huge number for no limit
            left = max(limit - usage, 0)
            avail = left if avail is None else min(avail, left)
            break
    return avail


def human(n: float) -> str:
    """Bytes as 'N.N GiB', 'N MiB' or 'N KiB'."""
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{max(n / 2**10, 1):.0f} KiB"


def check_fits(needed: float, what: str, advice: str) -> None:
    """Raise :class:`ResourceError` when ``needed`` bytes exceed the memory available now."""
    avail = available_bytes()
    if avail is None:
        log.debug("available memory unknown; %s (about %s) not checked", what, human(needed))
        return
    if needed > avail:
        raise ResourceError(f"{what} needs about {human(needed)} of memory but only {human(avail)} is available; "
                            f"{advice}")


def fit_bytes(x, n_clusters: int, cfg) -> int:
    """Memory a fit needs beyond the AnnData it is given (low estimate).

    Preprocessing holds the counts as CSR float32 (a copy unless they are already CSR float32),
    the cells with counts, their log-normalised values and a column-major copy for gene selection
    (4 CSR matrices of the input's non-zeros); training then keeps per cell the stage-1 hidden
    features, continuous codes and codes, and in stage 2 the embedding, q, P and labels.
    """
    if sp.issparse(x):
        nnz = x.nnz
    elif isinstance(x, np.ndarray) and x.ndim == 2 and x.dtype.kind in "biuf":
        nnz = int(np.count_nonzero(x))
    else:  # None, backed or malformed matrices: preprocessing reports what is wrong
        return 0
    n_cells = x.shape[0]
    prepare = 4 * nnz * CSR_BYTES_PER_VALUE + 3 * n_cells * 8
    per_cell = (cfg.hash_latent + cfg.hash_heads * cfg.bits_for(n_cells) + 2 * cfg.hash_heads + cfg.latent
                + 3 * n_clusters) * 4
    return int(prepare + n_cells * per_cell)


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far, GiB.

    On Linux the high-water mark of this process's own address space (``VmHWM``): ``ru_maxrss`` also
    carries the peak of the process that spawned it (Linux folds the parent's peak into it across
    ``vfork`` + ``exec``), so a run started by a large parent would report the parent's memory.
    Elsewhere ``ru_maxrss`` (KiB on Linux).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
