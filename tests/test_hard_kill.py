"""Every shipped config, killed with SIGKILL and resumed from ``last.ckpt`` through the real
``lit-zpd`` entry point, continues bit for bit as the same run uninterrupted.

Three processes per config: an uninterrupted run of ``STEPS`` optimizer steps; the same run
killed (:class:`tests.probes.KillAtStep`: SIGKILL, nothing runs on the way out) while the batch
after step ``KILLED_AFTER`` starts, which for ZPPO is in the middle of a rollout's minibatches and
for PACED across its loss switch; and ``--ckpt_path last`` from the killed run's checkpoint
directory. :class:`tests.probes.RankRecorder` writes what each trained on and ended with: the
per-step losses, the weights' and optimizer state's digests, every callback's state and the data
module's state must all be equal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.test_cli import CONFIGS, ROOT, config_files

STEPS, KILLED_AFTER = 5, 2


def _command(config: Path, out: Path, *extra: str) -> list[str]:
    # An asset config's SaveStudent writes the embedded model: point it at the run's own directory
    # (it is the config's last callback, so this comes before the probes are added).
    export = [f"--trainer.callbacks.init_args.dirpath={out / 'export'}"] if config.parent.name == "assets" else []
    return [
        sys.executable, "-m", "lit_zpd.cli", "fit", *(f"--config={path}" for path in config_files(config)), *export,
        f"--trainer.max_steps={STEPS}", "--report=null", "--trainer.val_check_interval=1000",
        "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}", f"--checkpoint.dirpath={out / 'checkpoints'}",
        "--checkpoint.every_n_train_steps=1", "--data.prompts_per_step=4", "--data.eval_samples=0",
        "--trainer.callbacks+=tests.probes.RankRecorder", f"--trainer.callbacks.out_dir={out}", *extra,
    ]


def _start(command: list[str]) -> subprocess.Popen[str]:
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _record(out: Path) -> dict[str, Any]:
    return _untimed(json.loads((out / "rank0.json").read_text()))


def _untimed(tree: Any) -> Any:
    """``tree`` without wall-clock metrics (``*_seconds``: a cached minibatch carries its
    rollout's), the only values two equal runs do not share."""
    if isinstance(tree, dict):
        return {k: _untimed(v) for k, v in tree.items() if not str(k).endswith("_seconds")}
    if isinstance(tree, list):
        return [_untimed(v) for v in tree]
    return tree


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_a_run_killed_and_resumed_equals_the_run_uninterrupted(config: Path, tmp_path: Path) -> None:
    full, killed, resumed = (tmp_path / name for name in ("full", "killed", "resumed"))
    # The uninterrupted and the killed run side by side (one core each), then the resume.
    runs = {
        "full": _start(_command(config, full)),
        "killed": _start(_command(config, killed, "--trainer.callbacks+=tests.probes.KillAtStep",
                                  f"--trainer.callbacks.step={KILLED_AFTER}")),
    }
    errors = {name: process.communicate(timeout=900)[1] for name, process in runs.items()}
    assert runs["full"].returncode == 0, errors["full"][-3000:]
    assert runs["killed"].returncode == -signal.SIGKILL, errors["killed"][-3000:]
    assert not (killed / "rank0.json").exists()  # it died before the end of fit

    resume = _start(_command(config, resumed, f"--checkpoint.dirpath={killed / 'checkpoints'}", "--ckpt_path=last"))
    stderr = resume.communicate(timeout=900)[1]
    assert resume.returncode == 0, stderr[-3000:]
    assert f"resuming from {killed / 'checkpoints' / 'last.ckpt'}" in stderr

    uninterrupted, continued = _record(full), _record(resumed)
    assert [b["step"] for b in continued["batches"]] == list(range(KILLED_AFTER, STEPS))
    assert continued["batches"] == uninterrupted["batches"][KILLED_AFTER:]  # problems, kinds and losses
    for key in ("global_step", "weights_sha256", "optimizer_sha256", "hooks", "data", "student_tokens"):
        assert continued[key] == uninterrupted[key], key
