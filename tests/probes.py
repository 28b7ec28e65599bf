"""A callback for multi-process tests: each rank writes what it trained on and what it ended with.

Loaded by the ``lit-zpd`` processes the DDP tests start
(``--trainer.callbacks+=tests.probes.RankRecorder``), so it lives in an importable module.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lit_zpd.rollout.plan import RolloutHook


class RankRecorder(Callback):
    """Writes ``<out_dir>/rank<k>.json``: the batches this rank trained on (step, rollout,
    minibatch, problem ids, kinds, policy version, the step's loss as an exact hex float), and at
    the end of ``fit`` the states of the rollout hooks and the library's other callbacks
    (checkpointing aside), the data module's state, and digests of the student's weights (sums,
    and a SHA-256 of their bytes) and of the optimizer's state.

    Args:
        out_dir: Where the files go.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.batches: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.batches.append({
            "step": trainer.global_step, "rollout": batch.rollout_index, "minibatch": batch.minibatch_index,
            "problem_ids": batch.problem_ids, "kinds": batch.kinds, "policy_version": batch.policy_version,
        })

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self.batches[-1]["loss"] = None if loss is None else float(loss).hex()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        data = trainer.datamodule
        weights = torch.cat([p.detach().flatten().double() for p in pl_module.student.parameters()])
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "batches": self.batches,
            "hooks": {
                type(cb).__name__: cb.state_dict() for cb in trainer.callbacks
                # A checkpoint callback's state is the run's own file paths, which differ between runs.
                if (isinstance(cb, RolloutHook) or type(cb).__module__.startswith("lit_zpd.callbacks."))
                and not isinstance(cb, ModelCheckpoint)
            },
            "pass_rates": data.pass_rates.state_dict(),
            "data": data.state_dict(),
            "weights_sha256": _digest(pl_module.student.state_dict()),
            "optimizer_sha256": _digest([optimizer.state_dict() for optimizer in trainer.optimizers]),
            "student_tokens": data.counters.student_tokens,
            "global_step": trainer.global_step,
            "nonfinite_steps": getattr(pl_module, "nonfinite_steps", None),
            "weights": [float(weights.sum()), float(weights.pow(2).sum())],
        }
        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(self.out_dir) / f"rank{trainer.global_rank}.json").write_text(json.dumps(record, default=_plain))


class StopAtStep(Callback):
    """Stops ``fit`` after optimizer step ``step`` as an interruption would, leaving the run's
    settings (``max_steps``, schedules) those of the whole run.

    Args:
        step: Optimizer steps to take.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _digest(tree: Any) -> str:
    """SHA-256 of a nest of tensors and plain values: equal only when every tensor is bit-equal."""
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(value.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                digest.update(str(key).encode())
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                feed(item)
        else:
            digest.update(repr(value).encode())

    feed(tree)
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    """Tensors (a controller's weights and optimizer state) as nested lists for JSON."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot record {type(value).__name__}")


class MarkStep(Callback):
    """Writes ``path`` once optimizer step ``step`` is done (a test waits for it to signal the run).

    Args:
        path: The file to write.
        step: Optimizer steps to take first.
    """

    def __init__(self, path: str, step: int) -> None:
        self.path, self.step = path, step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            Path(self.path).write_text(str(trainer.global_step))


class KillAtStep(Callback):
    """Kills its own process with SIGKILL once optimizer step ``step`` is done and checkpointed,
    as the next step's batch (a new rollout, or a later minibatch of one) starts: the hard kill a
    crashed node or an out-of-memory killer deals, with nothing run on the way out.

    Args:
        step: Optimizer steps to take first.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class PoisonRank(Callback):
    """Makes the loss of optimizer step ``step`` (1-based) NaN on rank ``rank`` only, as a
    diverging batch on one process would.

    Args:
        step: The step poisoned.
        rank: The rank whose batch it poisons.
    """

    def __init__(self, step: int, rank: int = 1) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step + 1 == self.step and trainer.global_rank == self.rank:
            batch.weights[:] = float("nan")
