"""Where a training step's time goes, per shipped config, as a table and a stacked bar chart.

    python scripts/bench_step.py                          # every top-level config in configs/, ~10 minutes
    python scripts/bench_step.py --configs gkd,grpo --steps 4
    python scripts/bench_step.py --png docs/images/step_breakdown.png --json docs/bench/step_breakdown.json

Each config runs through the real CLI for ``--steps`` optimizer steps with Lightning's
``SimpleProfiler`` (no evaluation, no start/end report, no logger). The library names its own
sections to the profiler (``rollout.sampling``, ``rollout.weight_sync``, ``distill.student_forward``,
``distill.teacher_forward``, ``distill.loss``); Lightning names its hooks. A step's time is split
into:

- rollout sampling: the engine's ``generate`` calls of the step (student, or the teacher for
  off-policy batches, and pass-rate measurements);
- weight sync: copying the new weights into the engine (vLLM only; HF samples the live model);
- rollout, other: the rest of the rollout (the hooks' phases, IOA's probes among them, scoring,
  building the batch);
- student forward, teacher forward: the decoder bodies, without the output head;
- loss: every loss term, fused: the head's logits and the closed-form gradients of the head and
  hidden states (work a plain path would do in backward);
- backward: the rest of the backward pass, through the decoder;
- optimizer: the optimizer step, gradient clipping and zeroing;
- callbacks: the callbacks' per-step hooks (sections they time themselves aside);
- Lightning and logging: the rest of ``training_step`` (logging, the loop).

The profiler's records are cleared when the first step ends (warm-up); the rest are averaged over
the steps after it. Numbers depend on what else the
machine runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning.pytorch import Callback, Trainer  # noqa: E402

PARTS = (
    "rollout sampling", "weight sync", "rollout, other", "student forward", "teacher forward",
    "loss", "backward", "optimizer", "callbacks", "Lightning and logging",
)
PER_STEP_HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
                  "on_before_optimizer_step", "on_before_zero_grad")


class _ForgetFirstStep(Callback):
    """Clears the profiler's records when the first step ends, so they cover the steps after it."""

    def on_train_batch_end(self, trainer: Trainer, *args: object) -> None:
        if trainer.global_step == 1:
            trainer.profiler.recorded_durations.clear()  # type: ignore[attr-defined]


def breakdown(config: Path, steps: int) -> dict[str, float]:
    from lit_zpd.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        cli = main([
            "--config", str(config), f"--trainer.max_steps={steps}", "--report=null", "--trainer.logger=false",
            "--trainer.profiler=lightning.pytorch.profilers.SimpleProfiler", f"--trainer.profiler.dirpath={tmp}",
            "--trainer.profiler.filename=profile", f"--trainer.val_check_interval={10 * steps}",
            "--trainer.enable_progress_bar=false", f"--checkpoint.dirpath={tmp}", f"--trainer.default_root_dir={tmp}",
        ], run=False)
        cli.trainer.callbacks.append(_ForgetFirstStep())
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        d = cli.trainer.profiler.recorded_durations
    strategy = next((k.split(".")[0] for k in d if k.startswith("[Strategy]")), "[Strategy]")

    def per(action: str) -> float:  # mean seconds per step after the first
        return sum(d.get(action, [])) / (steps - 1)

    rollout_total = per("[LightningDataModule]RolloutDataModule.on_before_batch_transfer")
    sampling, sync = per("rollout.sampling"), per("rollout.weight_sync")
    student, teacher, loss = per("distill.student_forward"), per("distill.teacher_forward"), per("distill.loss")
    training_step = per(f"{strategy}.training_step")
    backward = per(f"{strategy}.backward")
    optimizer_step = per("[LightningModule]DistillModule.optimizer_step")
    callbacks = sum(per(k) for k in d if k.startswith("[Callback]") and k.endswith(PER_STEP_HOOKS))
    return {
        "rollout sampling": sampling,
        "weight sync": sync,
        "rollout, other": max(0.0, rollout_total - sampling - sync),
        "student forward": student,
        "teacher forward": teacher,
        "loss": loss,
        "backward": backward,
        "optimizer": max(0.0, optimizer_step - training_step - backward),
        "callbacks": callbacks,
        "Lightning and logging": max(0.0, training_step - student - teacher - loss),
    }


def plot(results: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(names) + 2), 4.5))
    bottom = [0.0] * len(names)
    colors = plt.get_cmap("tab10").colors
    for part, color in zip(PARTS, colors):
        values = [results[n][part] for n in names]
        ax.bar(names, values, bottom=bottom, label=part, color=color)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("seconds per optimizer step")
    ax.set_title("Step time by part, embedded default (2 CPU cores)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", help="names in configs/ (comma-separated); every top-level YAML if omitted")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--png", type=Path, help="write the stacked bar chart here")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first is a warm-up)")
    names = args.configs.split(",") if args.configs else sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    results = {}
    print(f"seconds per optimizer step, mean of steps 2-{args.steps}\n")
    print("| config | total | " + " | ".join(PARTS) + " |")
    print("|---|---:|" + "---:|" * len(PARTS))
    for name in names:
        results[name] = breakdown(ROOT / "configs" / f"{name}.yaml", args.steps)
        row = results[name]
        print(f"| {name} | {sum(row.values()):.3f} | " + " | ".join(f"{row[p]:.3f}" for p in PARTS) + " |", flush=True)
    if args.png:
        plot(results, args.png)
        print(f"\nwrote {args.png}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
