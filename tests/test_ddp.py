"""Two processes (``strategy: ddp`` on CPU, gloo) through the real ``lit-zpd`` entry point.

Each rank must roll out its own problems, every callback's state must be identical on both ranks,
the weights must stay in sync, and a run resumed mid-rollout must continue exactly as an
uninterrupted one on every rank. :class:`tests.probes.RankRecorder` writes what each rank saw.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def fit(config: str, out: Path, *args: str, accelerator: str = "cpu", callback_args: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Run ``lit-zpd fit`` on 2 processes (CPU: gloo, GPU: nccl); return each rank's record.
    ``callback_args`` set the config's last callback (they come before the recorder is added)."""
    command = [
        sys.executable, "-m", "lit_zpd.cli", "fit", f"--config={ROOT / 'configs' / f'{config}.yaml'}",
        f"--trainer.accelerator={accelerator}", "--trainer.devices=2", "--trainer.strategy=ddp",
        "--trainer.val_check_interval=100", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}",
        "--data.source=lit_zpd.tasks.ArithmeticCurriculum", "--data.source.max_eval_per_skill=2",
        "--data.prompts_per_step=4", "--data.eval_samples=2", "--checkpoint.every_n_train_steps=1", *callback_args,
        "--trainer.callbacks+=tests.probes.RankRecorder", f"--trainer.callbacks.out_dir={out / 'ranks'}", *args,
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((out / "ranks" / f"rank{r}.json").read_text()) for r in range(2)]


def assert_ranks_agree(ranks: list[dict[str, Any]]) -> None:
    a, b = ranks
    assert (a["rank"], b["rank"], a["world_size"]) == (0, 1, 2)
    for x, y in zip(a["batches"], b["batches"], strict=True):
        assert (x["step"], x["rollout"], x["minibatch"]) == (y["step"], y["rollout"], y["minibatch"])
        assert not set(x["problem_ids"]) & set(y["problem_ids"]), x["step"]  # each rank its own problems
    assert a["hooks"] == b["hooks"]
    assert a["pass_rates"] == b["pass_rates"] and a["student_tokens"] == b["student_tokens"]
    assert a["weights"] == b["weights"]  # gradients were averaged


def test_grpo_on_two_processes(tmp_path: Path) -> None:
    ranks = fit("grpo", tmp_path, "--trainer.max_steps=3")
    assert_ranks_agree(ranks)
    # Both ranks' groups feed the tracker: 2 ranks x 3 rollouts x 4 problems.
    assert len(ranks[0]["pass_rates"]) == 24
    assert ranks[0]["student_tokens"] > 0


def test_zppo_on_two_processes_resumes_mid_rollout(tmp_path: Path) -> None:
    full = fit("zppo", tmp_path / "full", "--report=null", "--trainer.max_steps=8")
    assert_ranks_agree(full)
    assert full[0]["hooks"]["ReplayGraduationCallback"]["admissions"] > 0
    assert any(kind != "plain" for batch in full[0]["batches"] for kind in batch["kinds"])
    # Step 6 is minibatch 2 of rollout 1: the checkpoint must hold both ranks' unserved minibatches.
    fit("zppo", tmp_path / "first", "--report=null", "--trainer.max_steps=6")
    last = next((tmp_path / "first").rglob("last.ckpt"))
    resumed = fit("zppo", tmp_path / "resumed", "--report=null", "--trainer.max_steps=8", f"--ckpt_path={last}")
    assert_ranks_agree(resumed)
    for rank in range(2):
        assert [b["step"] for b in resumed[rank]["batches"]] == [6, 7]
        assert resumed[rank]["batches"] == full[rank]["batches"][6:]
        for key in ("hooks", "pass_rates", "student_tokens", "weights", "global_step"):
            assert resumed[rank][key] == full[rank][key], (rank, key)


def test_atesd_controller_agrees_across_processes(tmp_path: Path) -> None:
    ranks = fit(
        "atesd", tmp_path, "--report=null", "--trainer.max_steps=6",
        callback_args=tuple(f"--trainer.callbacks.init_args.{k}" for k in ("hold_steps=1", "lookahead=1", "decisions_per_update=2", "probe_size=4")),
    )
    assert_ranks_agree(ranks)  # includes the controller's weights, optimizer, decisions and probe losses
    assert ranks[0]["hooks"]["ExposureController"]["updates"] >= 2


def test_ioa_curriculum_agrees_across_processes(tmp_path: Path) -> None:
    """The probes are shared out and gathered: both ranks hold the same Organizer and draw from the
    same frontier (each its own problems). The callback arguments reach the CurriculumScheduler
    because it is the last callback of configs/ioa.yaml."""
    ranks = fit(
        "ioa", tmp_path, "--report=null", "--trainer.max_steps=4", "--data.source.max_eval_per_skill=12",
        callback_args=("--trainer.callbacks.init_args.probe_size=2", "--trainer.callbacks.init_args.reprobe_every_n_steps=2"),
    )
    assert_ranks_agree(ranks)
    state = ranks[0]["hooks"]["CurriculumScheduler"]
    assert len(state["history"]) == 2 and state["history"][0]["deficient"]


def test_alignment_probe_history_agrees_across_processes(tmp_path: Path) -> None:
    """Rank 0 measures and broadcasts: both ranks keep the same history."""
    ranks = fit(
        "kd", tmp_path, "--report=null", "--trainer.max_steps=2",
        callback_args=(
            "--trainer.callbacks+=lit_zpd.callbacks.alignment.GradientAlignmentProbe",
            "--trainer.callbacks.every_n_steps=2", "--trainer.callbacks.num_problems=2",
        ),
    )
    assert_ranks_agree(ranks)
    history = ranks[0]["hooks"]["GradientAlignmentProbe"]["history"]
    assert [h["step"] for h in history] == [0, 2] and "diagnostics/alignment/teacher/all" in history[0]


def test_a_nonfinite_step_on_one_rank_is_skipped_on_every_rank(tmp_path: Path) -> None:
    """Rank 1's loss of step 2 is NaN, rank 0's is finite: both drop that update and count it, and
    the weights stay in sync."""
    ranks = fit(
        "kd", tmp_path, "--report=null", "--trainer.max_steps=4", "--model.nonfinite=skip",
        "--trainer.callbacks+=tests.probes.PoisonRank", "--trainer.callbacks.step=2",
    )
    assert_ranks_agree(ranks)
    assert [r["nonfinite_steps"] for r in ranks] == [1, 1] and ranks[0]["global_step"] == 4


def test_a_nonfinite_step_on_one_rank_stops_every_rank(tmp_path: Path) -> None:
    """With ``model.nonfinite: stop`` every rank ends at the same step (none is left waiting in a
    collective), the run fails saying why, and the final checkpoint holds the last finite step."""
    with pytest.raises(AssertionError, match="not finite") as failed:
        fit("kd", tmp_path, "--report=null", "--trainer.max_steps=6", f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
            "--trainer.callbacks+=tests.probes.PoisonRank", "--trainer.callbacks.step=3")
    assert "FloatingPointError: optimizer step 3" in str(failed.value)
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 3 and last["nonfinite_steps"] == 1
    weights = torch.cat([v.flatten() for k, v in last["state_dict"].items() if k.startswith("student.")])
    assert torch.isfinite(weights).all()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (nccl); the CPU runs above cover the logic")
def test_zppo_on_two_gpus(tmp_path: Path) -> None:
    ranks = fit("zppo", tmp_path, "--report=null", "--trainer.max_steps=8", accelerator="gpu")
    assert_ranks_agree(ranks)


def test_micro_batches_on_two_processes_equal_one_pass(tmp_path: Path) -> None:
    """``model.micro_batch_size`` inside DDP: one backward per step, so gradients are averaged as
    for one pass, and the weights equal those of a run without micro-batches."""
    plain = fit("gkd", tmp_path / "plain", "--report=null", "--trainer.max_steps=3")
    micro = fit("gkd", tmp_path / "micro", "--report=null", "--trainer.max_steps=3", "--model.micro_batch_size=3")
    assert_ranks_agree(micro)
    assert [b["problem_ids"] for b in micro[0]["batches"]] == [b["problem_ids"] for b in plain[0]["batches"]]
    assert micro[0]["weights"] == pytest.approx(plain[0]["weights"], rel=1e-6)
    assert micro[0]["weights"] != pytest.approx(fit("gkd", tmp_path / "one", "--report=null", "--trainer.max_steps=1")[0]["weights"], rel=1e-9)
