"""Write the trained student as a plain Hugging Face model directory."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from peft import PeftModel
from typing_extensions import override


class SaveStudent(Callback):
    """Save the student (LoRA merged) and its tokenizer with ``save_pretrained`` when fit ends.

    Args:
        dirpath: Output directory; it is created, and files in it are overwritten.

    Example::

        trainer = Trainer(callbacks=[SaveStudent("out/student")])
    """

    def __init__(self, dirpath: str) -> None:
        if not dirpath:
            raise ValueError("SaveStudent.dirpath must be a non-empty path")
        self.dirpath = dirpath

    @override
    @rank_zero_only
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        student = pl_module.student
        if isinstance(student, PeftModel):
            student = copy.deepcopy(student).merge_and_unload()
        Path(self.dirpath).mkdir(parents=True, exist_ok=True)
        student.save_pretrained(self.dirpath)
        pl_module.tokenizer.save_pretrained(self.dirpath)
