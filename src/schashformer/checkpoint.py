"""Checkpoints of a fit, so that a killed run resumes where it stopped and ends with the same labels.

A checkpoint directory holds two files, each written to a temporary name and renamed into
place (``os.replace``), so a kill at any moment leaves the previous complete file:

``checkpoint.pt``
    everything a resumed fit needs, replaced every ``checkpoint_every`` training steps and at
    the end of each phase: the phase reached (:data:`PHASES`) and steps done in it, the state
    of every module built so far, the optimiser, the position in the current epoch (the
    epoch's permutation and offset), every random generator (the fit's numpy Generator, the
    torch generator of stage 1's masks and noise, torch's global generator for dropout and
    initialisation, numpy's legacy global one), the target distribution P of the clustering
    phase, the k-means labels and the loss histories.
``hashes.pt``
    the stage-1 hash codes, continuous codes and hidden features (cells-sized), written once
    when stage 1 ends, so that stage-2 checkpoints stay small.

Restoring the generators' exact states (rather than re-seeding them) keeps an uninterrupted
run's random numbers exactly what they were before checkpointing existed; a resumed run then
replays the same numbers from the saved position. A fingerprint (package version, data
checksum, every parameter, seed, device type) stops a checkpoint from being resumed by a
different run.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch

from .errors import InputError, TrainingError

log = logging.getLogger(__name__)

FORMAT = 1
STATE_FILE = "checkpoint.pt"
HASH_FILE = "hashes.pt"
# phases in the order a fit reaches them; "stage1", "pretrain" and "cluster" are mid-loop
PHASES = ("stage1", "stage1_done", "pretrain", "pretrain_done", "centres", "cluster", "done")


def fingerprint_arrays(*arrays) -> str:
    """SHA-256 of arrays (shape, dtype and bytes): identifies the data a checkpoint was trained on."""
    digest = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(f"{a.shape}{a.dtype}".encode())
        digest.update(memoryview(a.reshape(-1)).cast("B"))
    return "sha256:" + digest.hexdigest()


class Checkpointer:
    """Writes and reads the checkpoint of one fit.

    Parameters
    ----------
    directory : where ``checkpoint.pt`` and ``hashes.pt`` live (created when first written).
    every : steps between periodic checkpoints inside a training loop (0: phase ends only).
    fingerprint : identity of the run (version, data checksum, parameters, seed, device type).
    rng : the fit's numpy Generator, saved and restored with every checkpoint.

    ``modules`` (name -> torch module) lists the modules saved in every checkpoint and
    ``extra`` the fit-level items (loss history of stage 1, k-means labels); the fit fills
    both as it builds them.
    """

    def __init__(self, directory: str | Path, every: int, fingerprint: dict, rng: np.random.Generator):
        self.dir, self.every, self.fingerprint, self.rng = Path(directory), int(every), fingerprint, rng
        self.modules: dict[str, torch.nn.Module] = {}
        self.extra: dict = {}
        self.last: tuple[str, int] | None = None  # (phase, step) of the last checkpoint written or read

    @property
    def path(self) -> Path:
        return self.dir / STATE_FILE

    def due(self, done: int, total: int) -> bool:
        """A periodic checkpoint after ``done`` of ``total`` steps (the phase-end one covers ``done == total``)."""
        return self.every > 0 and done % self.every == 0 and done < total

    def describe(self) -> str:
        """Where the last good checkpoint is, for error messages."""
        if self.last is None:
            return f"no checkpoint was written yet (directory {self.dir})"
        phase, step = self.last
        return f"last good checkpoint {self.path} ({phase}, step {step}) is kept"

    # ------------------------------------------------------------------ writing
    def save(self, phase: str, step: int = 0, **items) -> None:
        """Replace the checkpoint with the current state; ``items`` are the loop's own (optimiser, position...)."""
        for name, module in self.modules.items():
            if not all(torch.isfinite(p).all() for p in module.parameters()):
                # a non-finite loss is caught before the optimiser step, but inf gradients can still
                # corrupt weights: never let such a state replace the last good checkpoint
                raise TrainingError(f"{phase}, step {step}: the {name} weights became non-finite; {self.describe()}")
        payload = {"format": FORMAT, "fingerprint": self.fingerprint, "phase": phase, "step": int(step),
                   "modules": {name: m.state_dict() for name, m in self.modules.items()},
                   "rng": self._rng_states(), **self.extra, **items}
        self._write(payload, self.path)
        self.last = (phase, int(step))
        log.debug("checkpoint: %s step %d", phase, step)

    def save_hashes(self, codes: np.ndarray, h: np.ndarray, hidden: np.ndarray) -> None:
        self._write({"fingerprint": self.fingerprint, "codes": torch.from_numpy(codes), "h": torch.from_numpy(h),
                     "hidden": torch.from_numpy(hidden)}, self.dir / HASH_FILE)

    def _write(self, payload: dict, target: Path) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            torch.save(payload, tmp)
            os.replace(tmp, target)  # atomic: a kill leaves the old checkpoint or the new one, never half
        finally:
            tmp.unlink(missing_ok=True)

    def remove(self) -> None:
        """Delete the checkpoint files (after a successful fit) and the directory if it is left empty."""
        for name in (STATE_FILE, HASH_FILE):
            (self.dir / name).unlink(missing_ok=True)
        try:
            self.dir.rmdir()
        except OSError:
            pass

    # ------------------------------------------------------------------ reading
    def load(self) -> dict | None:
        """The saved state, or None when there is no checkpoint; refuses one written by another run."""
        state = self._read(self.path)
        if state is None:
            return None
        if state.get("format") != FORMAT or state.get("phase") not in PHASES:
            raise InputError(f"{self.path}: not a checkpoint this version can resume; delete it to start again")
        self._check_fingerprint(state)
        self.last = (state["phase"], state["step"])
        return state

    def load_hashes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        state = self._read(self.dir / HASH_FILE)
        if state is None:
            raise InputError(f"{self.dir / HASH_FILE}: missing, but {self.path} is past stage 1; "
                             "delete the checkpoint directory to start again")
        self._check_fingerprint(state)
        return state["codes"].numpy(), state["h"].numpy(), state["hidden"].numpy()

    def _read(self, path: Path) -> dict | None:
        if not path.exists():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a corrupt file
            raise InputError(f"{path}: unreadable checkpoint ({type(exc).__name__}); delete it to start again") from None

    def _check_fingerprint(self, state: dict) -> None:
        saved = state.get("fingerprint") or {}
        differ = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
        if differ:
            raise InputError(f"{self.dir}: the checkpoint was written by another run (differs in {', '.join(differ)}); "
                             "resume with the same data, parameters and seed, or delete it to start again")

    # ------------------------------------------------------------------ random generators
    def _rng_states(self) -> dict:
        legacy = np.random.get_state()
        states = {"numpy": self.rng.bit_generator.state, "torch": torch.get_rng_state(),
                  "numpy_legacy": [legacy[0], torch.from_numpy(legacy[1].astype(np.int64)), *legacy[2:]]}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            states["cuda"] = torch.cuda.get_rng_state_all()
        return states

    def restore_rngs(self, state: dict) -> None:
        """Put every random generator back where it was when ``state`` was saved."""
        rngs = state["rng"]
        self.rng.bit_generator.state = rngs["numpy"]
        torch.set_rng_state(rngs["torch"])
        legacy = rngs["numpy_legacy"]
        np.random.set_state((legacy[0], legacy[1].numpy().astype(np.uint32), *legacy[2:]))
        if "cuda" in rngs and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rngs["cuda"])

    def load_modules(self, state: dict) -> None:
        """Load the saved weights into every registered module that the checkpoint holds."""
        for name, module in self.modules.items():
            if name in state["modules"]:
                module.load_state_dict(state["modules"][name])
