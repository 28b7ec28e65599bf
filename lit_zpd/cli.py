"""The ``lit-zpd`` command: LightningCLI over DistillModule and RolloutDataModule.

``lit-zpd fit --config configs/sft.yaml``, ``lit-zpd validate --config ...``,
``lit-zpd fit --config configs/sft.yaml --print_config``. Callbacks, including the pedagogical
ones, are listed under ``trainer.callbacks`` in the YAML.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningCLI

from lit_zpd.module import DistillModule
from lit_zpd.rollout.datamodule import RolloutDataModule

TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "logs", "name": "lit_zpd"},
    },
    "max_steps": 100,
    "val_check_interval": 50,
    "check_val_every_n_epoch": None,
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 1,
}


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Entry point of the ``lit-zpd`` console script.

    Args:
        args: Replaces ``sys.argv[1:]``.
        run: With ``False``, parse and instantiate only (no subcommand in ``args`` then).
    """
    return LightningCLI(
        DistillModule,
        RolloutDataModule,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
