"""Nothing lost at the end of a run, and no training on non-finite values."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from lit_zpd.callbacks.checkpoint import RunCheckpoint
from lit_zpd.module import DistillModule
from tests.test_rollout import make_data


class PoisonStep(Callback):
    """Makes the loss of optimizer step ``at`` (1-based) NaN, and keeps the student's weights
    after every step."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step + 1 == self.at:
            batch.weights[:] = float("nan")

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, *args: Any) -> None:
        self.weights[trainer.global_step] = {k: v.clone() for k, v in pl_module.student.state_dict().items()}


def _fit(module: DistillModule, tmp_path: Path, steps: int, every: int, *callbacks: Callback) -> Trainer:
    checkpoint = RunCheckpoint(dirpath=tmp_path, every_n_train_steps=every, save_last=True, save_on_exception=True)
    trainer = Trainer(
        max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[checkpoint, *callbacks],
    )
    trainer.fit(module, datamodule=make_data(data_source="reference", prompts_per_step=2))
    return trainer


def _saved(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_a_run_that_ends_between_intervals_checkpoints_its_final_step(tiny_student: str, tmp_path: Path) -> None:
    module = DistillModule(student=tiny_student, teacher=None)
    _fit(module, tmp_path, steps=3, every=2)
    last = _saved(tmp_path / "last.ckpt")
    assert last["global_step"] == 3
    assert torch.equal(last["state_dict"]["student.model.embed_tokens.weight"], module.student.model.embed_tokens.weight)


def test_a_nonfinite_step_stops_the_run_with_the_last_finite_weights_saved(tiny_student: str, tmp_path: Path) -> None:
    module = DistillModule(student=tiny_student, teacher=None, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    poison = PoisonStep(at=3)
    with pytest.raises(FloatingPointError, match="optimizer step 3: the loss or its gradients are not finite"):
        _fit(module, tmp_path, 6, 50, poison)
    assert module.nonfinite_steps == 1
    after_two = poison.weights[2]
    for key, value in module.student.state_dict().items():
        assert torch.equal(value, after_two[key]), key  # the NaN step changed nothing
    last = _saved(tmp_path / "last.ckpt")
    assert last["nonfinite_steps"] == 1
    for key, value in after_two.items():
        assert torch.equal(last["state_dict"][f"student.{key}"], value)
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_nonfinite_skip_drops_the_update_and_goes_on(tiny_student: str, tmp_path: Path) -> None:
    module = DistillModule(
        student=tiny_student, teacher=None, nonfinite="skip", optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
    )
    poison = PoisonStep(at=3)
    trainer = _fit(module, tmp_path, 5, 50, poison)
    assert trainer.global_step == 5 and module.nonfinite_steps == 1
    assert all(torch.equal(poison.weights[3][k], v) for k, v in poison.weights[2].items())  # step 3 changed nothing
    assert any(not torch.equal(poison.weights[4][k], v) for k, v in poison.weights[3].items())  # step 4 trained
    assert all(torch.isfinite(p).all() for p in module.student.parameters())
    with pytest.raises(ValueError, match="model.nonfinite"):
        DistillModule(student=tiny_student, teacher=None, nonfinite="ignore")  # type: ignore[arg-type]


def test_sigterm_saves_the_last_completed_step_and_exits_143(tmp_path: Path) -> None:
    """How a scheduler stops a job: the step under way ends, ``last.ckpt`` holds it, the status
    says the run did not finish, and the message names the file to resume from."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    marker = tmp_path / "marker"
    command = [
        sys.executable, "-m", "lit_zpd.cli", "fit", f"--config={root / 'configs' / 'sft.yaml'}", "--report=null",
        "--trainer.max_steps=100000", "--trainer.val_check_interval=100000", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--checkpoint.every_n_train_steps=100000", f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
        "--trainer.callbacks+=tests.probes.MarkStep", f"--trainer.callbacks.path={marker}", "--trainer.callbacks.step=3",
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), process.communicate()[1][-3000:] if process.poll() is not None else "no step 3 in 300 s"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr[-3000:]
    last = tmp_path / "ckpt" / "last.ckpt"
    assert "stopped by SIGTERM after step" in stderr and str(last) in stderr
    assert _saved(last)["global_step"] >= 3  # the checkpoint interval was never reached


class RaiseAtStep(Callback):
    """Raises after optimizer step ``step``, as a crash in the middle of a run would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"crash after step {trainer.global_step}")


def test_an_exception_through_the_cli_saves_the_last_completed_step(tmp_path: Path) -> None:
    from lit_zpd.cli import main

    root = Path(__file__).resolve().parents[1]
    with pytest.raises(RuntimeError, match="crash after step 3"):
        main([
            "fit", f"--config={root / 'configs' / 'sft.yaml'}", "--report=null", "--trainer.max_steps=50",
            "--trainer.val_check_interval=100", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
            "--trainer.callbacks+=tests.test_reliability.RaiseAtStep", "--trainer.callbacks.step=3",
        ])
    assert _saved(tmp_path / "ckpt" / "last.ckpt")["global_step"] == 3


def _a_checkpoint(path: Path) -> None:
    from lit_zpd.checkpoint_io import AtomicCheckpointIO

    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.arange(1000.0)}, "global_step": 7}, path)


def test_an_interrupted_write_leaves_the_previous_checkpoint_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lit_zpd import checkpoint_io

    last = tmp_path / "last.ckpt"
    _a_checkpoint(last)
    good = last.read_bytes()

    def killed_midway(obj: Any, f: Any) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # the process is stopped during the write

    monkeypatch.setattr(checkpoint_io.torch, "save", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_io.AtomicCheckpointIO().save_checkpoint({"global_step": 8}, last)
    assert last.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


@pytest.mark.parametrize("damage", ["empty", "flipped bytes", "random bytes"])
def test_a_damaged_checkpoint_is_named_with_the_ones_to_use_instead(tmp_path: Path, damage: str) -> None:
    from lit_zpd.checkpoint_io import AtomicCheckpointIO, CheckpointError

    good, bad = tmp_path / "epoch=0-step=50.ckpt", tmp_path / "last.ckpt"
    _a_checkpoint(good)
    _a_checkpoint(bad)
    data = bytearray(bad.read_bytes())
    if damage == "empty":
        data = bytearray()
    elif damage == "flipped bytes":
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    else:
        data = bytearray(os.urandom(len(data)))
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"checkpoint {bad} .*resume from another checkpoint of {tmp_path}: {good}"):
        AtomicCheckpointIO().load_checkpoint(bad)
    assert AtomicCheckpointIO().load_checkpoint(good)["global_step"] == 7


def test_the_cli_trains_with_atomic_checkpoints() -> None:
    from lit_zpd.checkpoint_io import AtomicCheckpointIO
    from lit_zpd.cli import main

    root = Path(__file__).resolve().parents[1]
    cli = main(["--config", str(root / "configs" / "sft.yaml"), "--report=null"], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


class FirstStep(Callback):
    """Writes the global step training starts from into ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer: Trainer, *args: Any) -> None:
        Path(self.path).write_text(str(trainer.global_step))


def test_ckpt_path_last_resumes_the_newest_run_of_the_logger_directory(tmp_path: Path) -> None:
    from lit_zpd.cli import main

    root = Path(__file__).resolve().parents[1]

    def fit(steps: int, *extra: str) -> int:
        main([
            "fit", f"--config={root / 'configs' / 'sft.yaml'}", "--report=null", f"--trainer.max_steps={steps}",
            "--trainer.val_check_interval=100", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.callbacks+=tests.test_reliability.FirstStep", f"--trainer.callbacks.path={tmp_path / 'first'}", *extra,
        ])
        return int((tmp_path / "first").read_text())

    assert fit(2) == 0
    assert fit(4, "--ckpt_path=last") == 2  # version_1 resumed version_0's last.ckpt
    assert fit(5, "--ckpt_path=last") == 4  # and version_2 the newer version_1's
    with pytest.raises(FileNotFoundError, match="--ckpt_path last: no last.ckpt under"):
        fit(6, "--ckpt_path=last", f"--checkpoint.dirpath={tmp_path / 'empty'}")
