"""Checkpoint files: written atomically next to their destination, checked before they are read.

Lightning's writer saves through an fsspec transaction whose temporary file lies in the system's
temporary directory; when that is another filesystem the final move is a copy, and a kill during
it leaves a truncated ``last.ckpt`` in place of the good one. And ``torch.load`` resumes silently
from a file with flipped bytes (it does not check the CRCs its zip format records) and fails on
an empty one with a bare ``EOFError`` that names no file. :class:`AtomicCheckpointIO` writes to a
temporary file in the checkpoint's own directory, flushes it to disk and renames it over the
destination (one atomic step on every local filesystem), and checks a file before loading it.
The ``lit-zpd`` command installs it unless ``trainer.plugins`` is set.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from typing_extensions import override


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be resumed from; the message names it and the alternatives."""


def check_checkpoint(path: str | os.PathLike[str]) -> None:
    """Raises :class:`CheckpointError` if ``path`` is missing, empty or not an intact checkpoint
    (its zip records' CRCs are verified), naming the other checkpoints of its directory, newest
    first, to resume from instead."""
    path = Path(path)
    problem = None
    if not path.is_file():
        problem = "does not exist"
    elif path.stat().st_size == 0:
        problem = "is empty (a write was interrupted)"
    elif not zipfile.is_zipfile(path):
        problem = "is not a checkpoint written by torch.save (no zip archive)"
    else:
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            bad = f"an unreadable archive ({err})"
        if bad is not None:
            problem = f"is corrupt (damaged record: {bad})"
    if problem is None:
        return
    others = sorted(
        (p for p in path.parent.glob("*.ckpt") if p != path and p.stat().st_size > 0),
        key=lambda p: p.stat().st_mtime, reverse=True,
    ) if path.parent.is_dir() else []
    fallback = f"; resume from another checkpoint of {path.parent}: {', '.join(str(p) for p in others)}" if others else ""
    raise CheckpointError(f"checkpoint {path} {problem}{fallback}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoint IO with atomic local writes and checked reads.

    Example::

        Trainer(plugins=[AtomicCheckpointIO()])
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: its own writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return None

    @override
    def load_checkpoint(
        self, path: Any, map_location: Any | None = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if "://" not in str(path):
            check_checkpoint(path)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
