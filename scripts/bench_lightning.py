"""Lightning's overhead: DistillModule trained by a Trainer against a hand-written loop, side by side.

    python scripts/bench_lightning.py             # the embedded student (0.31M, 7 rounds) and a 25M model (3); ~12 minutes
    python scripts/bench_lightning.py --quick     # the embedded student only, 3 rounds: 2 minutes

Both paths train the same module class from the same weights on the same pre-built batches
(GKD's loss: generalized JSD to a frozen teacher, AdamW, gradient norm clipped at 1): the loop
calls ``module.step_loss``, ``backward``, ``clip_grad_norm_``, ``step`` and ``zero_grad``; the
Trainer runs ``training_step`` with its logging (no logger, progress bar or checkpoints). Time is
the steady state: from the start of step ``--warmup`` to the end of the last step. The weights after
the run are compared (they must agree: same work). Rounds alternate which path runs first. Prints a markdown table; the ratio is
Trainer / loop.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lit_zpd.assets import resolve  # noqa: E402
from lit_zpd.cli import configure_threads  # noqa: E402
from lit_zpd.loss_config import LossConfig  # noqa: E402
from lit_zpd.module import DistillModule  # noqa: E402
from lit_zpd.rollout.batch import RolloutBatch, pack_rows  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from bench_rollout import random_model  # noqa: E402

LOSS = LossConfig(jsd=1.0, jsd_beta=0.5)


def make_batches(count: int, rows: int, prompt: int, response: int, vocab: int, seed: int = 0) -> list[RolloutBatch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (rows, prompt + response), generator=g).tolist()
        input_ids, attention_mask, response_mask = pack_rows([r[:prompt] for r in ids], [r[prompt:] for r in ids], 0)
        out.append(RolloutBatch(
            input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask,
            teacher_input_ids=input_ids, teacher_attention_mask=attention_mask, teacher_response_mask=response_mask,
            sampling_logprobs=None, rewards=torch.zeros(rows), advantages=torch.zeros(rows), weights=torch.ones(rows),
            pass_rate=torch.zeros(rows), group_index=torch.arange(rows), problem_ids=[str(i) for i in range(rows)],
            skills=["s"] * rows, kinds=["plain"] * rows, prompts=[""] * rows, completions=[""] * rows, source="reference",
        ))
    return out


def module(student: str, teacher: str) -> DistillModule:
    return DistillModule(student=student, teacher=teacher, loss=LOSS, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4))


def hand_loop(student: str, teacher: str, batches: list[RolloutBatch], warmup: int) -> tuple[float, DistillModule]:
    m = module(student, teacher).train()
    optimizer = m.configure_optimizers()
    for i, batch in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        loss, _, _ = m.step_loss(batch, LOSS)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return (time.perf_counter() - start) / (len(batches) - warmup), m


class _Clock(Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer: Trainer, *args: object) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, *args: object) -> None:
        self.end = time.perf_counter()


def trainer_run(student: str, teacher: str, batches: list[RolloutBatch], warmup: int) -> tuple[float, DistillModule]:
    m = module(student, teacher)
    clock = _Clock(warmup)
    trainer = Trainer(
        max_steps=len(batches), logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, gradient_clip_val=1.0, callbacks=[clock], accelerator="cpu", devices=1,
    )
    trainer.fit(m, train_dataloaders=DataLoader(batches, batch_size=None, shuffle=False))
    return (clock.end - clock.start) / (len(batches) - warmup), m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=7, help="rounds for the embedded student")
    parser.add_argument("--rounds-large", type=int, default=3, help="rounds for the 25M model")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 3
    threads = configure_threads()
    with tempfile.TemporaryDirectory() as tmp:
        models = [("embedded student (0.31M), embedded teacher", resolve("embedded:student"), resolve("embedded:teacher"))]
        if not args.quick:
            big = random_model(Path(tmp) / "m25", hidden=512, layers=8)
            models.append(("random Qwen3 25M, itself as teacher", big, big))
        print(f"{args.steps} steps ({args.warmup} warm-up), {args.rows} rows of 24 prompt + 48 response tokens, "
              f"rounds alternating which path runs first, {threads} threads\n")
        print("| model | params | rounds | loop ms/step | Trainer ms/step | Trainer / loop: median [min, max] of rounds | max weight diff |")
        print("|---|---:|---:|---:|---:|---|---:|")
        for (name, student, teacher), rounds in zip(models, (args.rounds, args.rounds_large)):
            probe = module(student, teacher)
            params = sum(p.numel() for p in probe.student.parameters())
            batches = make_batches(args.steps, args.rows, 24, 48, len(probe.tokenizer))
            loops, trainers, ratios = [], [], []
            for r in range(rounds):
                if r % 2 == 0:
                    loop_s, by_hand = hand_loop(student, teacher, batches, args.warmup)
                    trainer_s, by_trainer = trainer_run(student, teacher, batches, args.warmup)
                else:  # the other order, so that whatever the first run leaves behind falls on both
                    trainer_s, by_trainer = trainer_run(student, teacher, batches, args.warmup)
                    loop_s, by_hand = hand_loop(student, teacher, batches, args.warmup)
                loops.append(loop_s)
                trainers.append(trainer_s)
                ratios.append(trainer_s / loop_s)
            diff = max((a - b).abs().max().item() for a, b in zip(by_hand.student.parameters(), by_trainer.student.parameters()))
            print(f"| {name} | {params / 1e6:.2f}M | {rounds} | {1e3 * statistics.median(loops):.1f} | "
                  f"{1e3 * statistics.median(trainers):.1f} | {statistics.median(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}] | "
                  f"{diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
