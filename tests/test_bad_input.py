"""A mistake in a config or a model directory is reported at once, naming what to fix.

Data-file mistakes are tested in tests/test_dataset_source.py, prompts too long for the model's
context in tests/test_prompts.py, a teacher with another vocabulary in tests/test_teacher.py and
tests/test_module.py; docs/RELIABILITY.md lists them all."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lit_zpd.assets import resolve
from lit_zpd.cli import main
from lit_zpd.model_files import load_causal_lm, load_config, load_tokenizer
from lit_zpd.module import DistillModule

ROOT = Path(__file__).resolve().parents[1]
SFT = str(ROOT / "configs" / "sft.yaml")


@pytest.fixture
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a model starts loading: the error under test must come first."""

    def refuse(path: str) -> None:
        raise AssertionError(f"a model was loaded ({path}) before the bad setting was reported")

    monkeypatch.setattr("lit_zpd.module.load_tokenizer", refuse)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--data.samples_per_prompt=0", "data.samples_per_prompt must be >= 1, got 0"),
        ("--data.eval_samples=-1", "data.eval_samples must be >= 0, got -1"),
        ("--data.lmbda=1.5", r"data.lmbda must be in \[0, 1\], got 1.5"),
        ("--model.optimizer.init_args.lr=-1", "model.optimizer: Invalid learning rate: -1"),
    ],
)
def test_a_bad_setting_fails_before_any_model_loads(override: str, message: str, no_model_loads: None) -> None:
    with pytest.raises(ValueError, match=message):
        main(["--config", SFT, override], run=False)


@pytest.mark.parametrize("where", ["relative", "absolute"])
@pytest.mark.parametrize("key", ["student", "teacher"])
def test_a_missing_model_directory_is_named_and_no_hub_is_reached(
    where: str, key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers takes a path that is not a directory for a hub id; lit_zpd says it is missing.
    The error is raised before transformers is asked (conftest keeps the suite offline besides)."""
    monkeypatch.chdir(tmp_path)
    missing = "models/nowhere" if where == "relative" else str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=f"no model directory at {missing}: .*nothing is downloaded from a hub"):
        main(["--config", SFT, f"--model.{key}={missing}"], run=False)


@pytest.fixture
def damaged_model(tmp_path: Path) -> dict[str, Path]:
    """Copies of the embedded student: weights cut short, a broken config, no files at all."""
    source = Path(resolve("embedded:student"))
    copies = {}
    for name in ("truncated_weights", "broken_config", "empty"):
        copies[name] = shutil.copytree(source, tmp_path / name) if name != "empty" else tmp_path / name
    copies["empty"].mkdir()
    weights = next(copies["truncated_weights"].glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    (copies["broken_config"] / "config.json").write_text('{"model_type": "qwen3", ')
    return copies


@pytest.mark.parametrize(
    ("damage", "loader", "what"),
    [
        ("truncated_weights", load_causal_lm, "model"),
        ("broken_config", load_config, "model config"),
        ("empty", load_tokenizer, "tokenizer"),
        ("empty", load_config, "model config"),
    ],
)
def test_a_damaged_model_directory_is_named(damage: str, loader: object, what: str, damaged_model: dict[str, Path]) -> None:
    path = damaged_model[damage]
    with pytest.raises(ValueError, match=f"(?s)cannot load the {what} at {path}: .*damaged or incomplete model directory"):
        loader(str(path))  # type: ignore[operator]


def test_a_damaged_student_is_named_through_the_module(damaged_model: dict[str, Path]) -> None:
    path = damaged_model["truncated_weights"]
    with pytest.raises(ValueError, match=f"cannot load the model at {path}"):
        DistillModule(student=str(path), teacher=None)


def _overlay(tmp_path: Path, callback: str) -> str:
    path = tmp_path / "overlay.yaml"
    path.write_text(f"trainer:\n  callbacks:\n    - {callback}\n")
    return str(path)


def test_an_unknown_callback_argument_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    overlay = _overlay(
        tmp_path, "class_path: lit_zpd.callbacks.beta_kernel.BetaKernelWeighting\n      init_args: {alpha: 1.0, gama: 2.0}"
    )
    with pytest.raises(SystemExit):
        main(["--config", SFT, "--config", overlay], run=False)
    assert "gama" in capsys.readouterr().err


def test_an_out_of_range_callback_value_is_named(tmp_path: Path) -> None:
    overlay = _overlay(tmp_path, "class_path: lit_zpd.callbacks.beta_kernel.BetaKernelWeighting\n      init_args: {alpha: -1.0}")
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        main(["--config", SFT, "--config", overlay], run=False)
