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


def _fit(
    module: DistillModule, tmp_path: Path, steps: int, every: int, *callbacks: Callback,
    ckpt_path: str | None = None, **data: Any,
) -> Trainer:
    checkpoint = RunCheckpoint(dirpath=tmp_path, every_n_train_steps=every, save_last=True, save_on_exception=True)
    trainer = Trainer(
        max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[checkpoint, *callbacks],
    )
    trainer.fit(module, datamodule=make_data(**({"data_source": "reference", "prompts_per_step": 2} | data)), ckpt_path=ckpt_path)
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


def _cli_fit(tmp_path: Path, *extra: str) -> None:
    from lit_zpd.cli import main

    root = Path(__file__).resolve().parents[1]
    main([
        "fit", f"--config={root / 'configs' / 'sft.yaml'}", "--report=null", "--trainer.val_check_interval=100",
        "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}", *extra,
    ])


def test_the_last_good_checkpoints_are_kept_besides_the_newest(tmp_path: Path) -> None:
    """Lightning's default keeps one step file and deletes the one before; lit-zpd keeps
    ``checkpoint.save_top_k`` (2) of the newest besides ``last.ckpt``."""
    for keep, steps in ((None, 4), (3, 5)):
        where = tmp_path / f"keep_{keep}"
        _cli_fit(
            where, "--trainer.max_steps=" + str(steps), "--checkpoint.every_n_train_steps=1", f"--checkpoint.dirpath={where}",
            *([f"--checkpoint.save_top_k={keep}"] if keep else []),
        )
        kept = sorted(p.name for p in where.glob("*.ckpt"))
        newest = range(steps - (keep or 2) + 1, steps + 1)
        assert kept == sorted([*(f"epoch=0-step={s}.ckpt" for s in newest), "last.ckpt"])
        assert _saved(where / f"epoch=0-step={steps - 1}.ckpt")["global_step"] == steps - 1


@pytest.mark.parametrize("key", ["--trainer.logger.init_args.save_dir", "--checkpoint.dirpath"])
def test_a_directory_that_cannot_be_written_fails_the_run_at_its_start(
    key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory under a regular file can be neither made nor written (as root too)."""
    from lit_zpd.module import DistillModule

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    steps: list[int] = []
    monkeypatch.setattr(DistillModule, "training_step", lambda self, *a: steps.append(1))
    with pytest.raises(OSError, match=rf"\({key.removeprefix('--')}.*\) {blocker}/logs.* cannot be written"):
        _cli_fit(tmp_path, "--trainer.max_steps=2", f"{key}={blocker / 'logs'}")
    assert steps == []


# ------------------------------------------------------------------------------ bad problems, engine faults


def test_a_problem_that_makes_sampling_raise_is_skipped_counted_and_named(make_context: Any) -> None:
    """The scripted engine raises (KeyError) on the prompt it has no answer for: the batch call
    fails, each prompt is sampled alone, and only that problem sits out."""
    from lit_zpd.rollout.pass_rates import PassRateSettings
    from lit_zpd.rollout.pipeline import RolloutPipeline
    from lit_zpd.rollout.sampler import ProblemSampler
    from tests.conftest import ListSource, ScriptedEngine

    ctx = make_context(ScriptedEngine({"0+1=?\n": ["\\boxed{1}"], "2+1=?\n": ["\\boxed{3}"]}), source=ListSource(3))
    pipeline = RolloutPipeline(
        ctx, ProblemSampler(ctx.source.problems("train"), 3, seed=0), [], samples_per_prompt=2, data_source="student",
        lmbda=None, off_policy_source="teacher", teacher_samples_per_prompt=1, teacher_correct_only=False,
        advantage_estimator="grpo", advantage_scale_by_std=True, pass_rate=PassRateSettings(),
    )
    with pytest.warns(UserWarning, match=r"rollout 0: problem 'p1' skipped, sampling raised KeyError"):
        batch = pipeline.rollout(0)
    assert sorted(set(batch.problem_ids)) == ["p0", "p2"]
    assert ctx.counters.problems_failed == 1
    assert batch.metrics["rollout/problems_failed_total"] == 1.0


def test_an_evaluation_leaves_out_a_problem_that_makes_sampling_raise(make_context: Any) -> None:
    """The start report, validation and curriculum probes evaluate through the same guard: the
    problem is named, counted and left out, the others are scored in the order given."""
    from tests.conftest import ListSource, ScriptedEngine

    ctx = make_context(ScriptedEngine({"0+1=?\n": ["\\boxed{1}"], "2+1=?\n": ["\\boxed{4}"]}), source=ListSource(3))
    with pytest.warns(UserWarning, match=r"evaluation: problem 'p1' skipped, sampling raised KeyError"):
        results = ctx.evaluate(ctx.student, ctx.source.problems("train"), samples=0)
    assert results.problem_ids == ["p0", "p2"] and results.greedy_correct.tolist() == [1.0, 0.0]
    assert ctx.take_pending().problems_failed == 1  # in the run's total at the next rollout


def test_a_problem_that_makes_tokenising_raise_is_skipped_and_the_run_resumes(
    tiny_student: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the same batch raised on every resume. Now the problem is skipped at every visit,
    and a resumed run goes past the step where it would have crashed."""
    from lit_zpd.loss_config import LossConfig
    from lit_zpd.rollout.prompts import PromptEncoder
    from tests.conftest import ListSource

    encode = PromptEncoder.encode

    def raising(self: PromptEncoder, prompt: str) -> list[int]:
        if prompt.startswith("1+1"):
            raise ValueError("the tokenizer cannot read this row")
        return encode(self, prompt)

    monkeypatch.setattr(PromptEncoder, "encode", raising)
    data = {"data_source": "student", "source": ListSource(3), "prompts_per_step": 3}

    def module() -> DistillModule:
        return DistillModule(student=tiny_student, teacher=None, loss=LossConfig(policy=1.0))

    with pytest.warns(UserWarning, match=r"problem 'p1' skipped, tokenising its prompt raised ValueError: the tokenizer"):
        first = _fit(module(), tmp_path, 2, 1, **data)
    assert first.datamodule.counters.problems_failed == 2  # drawn at both steps
    resumed = _fit(module(), tmp_path, 4, 1, ckpt_path=str(tmp_path / "last.ckpt"), **data)
    assert resumed.global_step == 4
    assert resumed.datamodule.counters.problems_failed == 4  # the count is kept in the checkpoint


def _fail_from(module: DistillModule, original: Any, step: int) -> Any:
    """An engine method that raises from optimizer step ``step`` on, as a lost device would."""

    def method(engine: Any, *args: Any) -> Any:
        if module.trainer.global_step >= step:
            raise RuntimeError("device lost")
        return original(engine, *args)

    return method


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("generate", r"the HFEngine engine failed on every prompt of rollout 2 \(weights of optimizer step 2\)"),
        ("sync_weights", r"the HFEngine engine failed to take the weights of optimizer step 2"),
    ],
)
def test_an_engine_fault_leaves_a_checkpoint_of_the_last_completed_step(
    method: str, message: str, tiny_student: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from lit_zpd.loss_config import LossConfig
    from lit_zpd.rollout.context import EngineFault
    from lit_zpd.rollout.hf_engine import HFEngine

    module = DistillModule(student=tiny_student, teacher=None, loss=LossConfig(policy=1.0))
    monkeypatch.setattr(HFEngine, method, _fail_from(module, getattr(HFEngine, method), step=2))
    with pytest.raises(EngineFault, match=message + ": RuntimeError: device lost"):
        _fit(module, tmp_path, 5, 50, data_source="student")
    last = _saved(tmp_path / "last.ckpt")
    assert last["global_step"] == 2
    assert torch.equal(last["state_dict"]["student.model.embed_tokens.weight"], module.student.model.embed_tokens.weight)
    err = capsys.readouterr().err
    assert f"the run failed after step 2 with EngineFault; saved to {tmp_path / 'last.ckpt'}" in err


def test_a_changed_setting_on_resume_is_applied_or_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Lightning's CLI replaces ``--model.*`` by the checkpoint's settings on resume; lit-zpd applies
    a changed loss setting (announced, and the resumed run's checkpoint records it) and refuses a
    change to what built the weights or the optimizer state, before any model loads."""
    first = tmp_path / "first"
    _cli_fit(first, "--trainer.max_steps=2", f"--checkpoint.dirpath={first}")
    capsys.readouterr()

    _cli_fit(tmp_path / "same", "--trainer.max_steps=3", f"--ckpt_path={first / 'last.ckpt'}")
    assert "lit-zpd: resuming with" not in capsys.readouterr().err

    second = tmp_path / "second"
    _cli_fit(second, "--trainer.max_steps=3", f"--checkpoint.dirpath={second}", f"--ckpt_path={first / 'last.ckpt'}",
             "--model.loss.forward_kl=0.5")
    assert "lit-zpd: resuming with model.loss.forward_kl = 0.5 (the checkpoint's run had 0.0)" in capsys.readouterr().err
    resumed = _saved(second / "last.ckpt")
    assert resumed["global_step"] == 3 and resumed["hyper_parameters"]["loss"]["forward_kl"] == 0.5

    import lit_zpd.module

    loaded = []
    original = lit_zpd.module._load_student
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lit_zpd.module, "_load_student", lambda *a, **k: loaded.append(1) or original(*a, **k))
        for change, named in (
            ("--model.lora.r=4", "model.lora: None in the checkpoint"),
            ("--model.optimizer.init_args.lr=0.01", "model.optimizer.init_args.lr: 0.001 in the checkpoint, 0.01 now"),
        ):
            with pytest.raises(ValueError, match="a resumed run keeps the model and optimizer") as error:
                _cli_fit(tmp_path / "refused", "--trainer.max_steps=3", f"--ckpt_path={first / 'last.ckpt'}", change)
            assert named in str(error.value)
    assert not loaded
