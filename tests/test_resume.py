"""A run stopped and resumed from its checkpoint continues exactly like an uninterrupted one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_zpd.module import DistillModule, LossConfig
from tests.test_rollout import make_data


class BatchLog(Callback):
    def __init__(self) -> None:
        self.batches: list[tuple[int, list[str], torch.Tensor]] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.batches.append((batch.batch_index, batch.problem_ids, batch.input_ids.clone()))


def run(student: str, teacher: str, steps: int, root: Path, ckpt_path: str | None = None) -> tuple[DistillModule, BatchLog]:
    seed_everything(0)
    module = DistillModule(
        student=student, teacher=teacher, loss=LossConfig(jsd=1.0, sft=0.1),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
    )
    log = BatchLog()
    trainer = Trainer(
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=root,
        callbacks=[log, ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_top_k=-1, filename="{step}")],
    )
    trainer.fit(module, datamodule=make_data(lmbda=0.5, off_policy_source="teacher"), ckpt_path=ckpt_path)
    return module, log


def test_resume_matches_uninterrupted_run(tiny_student: str, tiny_teacher: str, tmp_path: Path) -> None:
    full, full_log = run(tiny_student, tiny_teacher, 4, tmp_path / "full")
    run(tiny_student, tiny_teacher, 2, tmp_path / "first")
    resumed, resumed_log = run(tiny_student, tiny_teacher, 4, tmp_path / "second", str(tmp_path / "first" / "step=2.ckpt"))
    assert [b[0] for b in resumed_log.batches] == [2, 3]
    for (i, ids, tokens), (j, ids2, tokens2) in zip(full_log.batches[2:], resumed_log.batches):
        assert (i, ids) == (j, ids2)
        assert torch.equal(tokens, tokens2)
    for (name, a), b in zip(full.student.state_dict().items(), resumed.student.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
