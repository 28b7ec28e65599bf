"""ZPPO: replay buffer, BCQ/NCQ prompts, REINFORCE++ advantages, clipping, PPO minibatches, resume."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_zpd.callbacks.replay_graduation import ReplayGraduationCallback
from lit_zpd.losses import clipped_policy_loss, group_advantages, reinforce_pp_advantages
from lit_zpd.module import DistillModule, LossConfig
from lit_zpd.rollout.engine import Completion, SamplingConfig
from lit_zpd.rollout.plan import PromptSpec, RolloutGroup, RolloutHook, RolloutPlan
from lit_zpd.tasks.problem import Problem
from lit_zpd.tasks.reformulate import (
    ReformulationTemplates,
    TruncateCandidates,
    augmentation_order,
    build_bcq,
    build_ncq,
    wrong_answers,
)
from tests.test_rollout import make_data, make_trainer


def problem(i: int) -> Problem:
    return Problem(problem_id=f"p{i}", prompt=f"{i}+1=?\n", answer=str(i + 1))


def plan_of(ids: list[int], index: int = 0, source: str = "student") -> RolloutPlan:
    prompts = [PromptSpec(problem(i)) for i in ids]
    return RolloutPlan(index=index, policy_version=index, source=source, prompts=prompts)  # type: ignore[arg-type]


def group(i: int, rewards: list[float], kind: str = "plain", texts: list[str] | None = None) -> RolloutGroup:
    texts = texts or [f"\\boxed{{{i + 1 if r else 0}}}" for r in rewards]
    spec = PromptSpec(problem(i), kind=kind)  # type: ignore[arg-type]
    return RolloutGroup(spec, [[0]] * len(rewards), texts, rewards)


# ----------------------------------------------------------------------------- buffer


def test_admission_only_for_hard_plain_groups_on_student_batches() -> None:
    cb = ReplayGraduationCallback()
    groups = [
        group(0, [0, 0, 0, 1]), group(1, [1, 1, 0, 0]), group(2, [0, 0], kind="bcq"), group(3, [0, 0], kind="ncq")
    ]
    cb.on_rollout_scored(None, plan_of([0, 1]), groups)
    assert list(cb.buffer) == ["p0"]  # 0.25 < 0.5 is hard; 0.5 is not; BCQ/NCQ never count
    cb.on_rollout_scored(None, plan_of([4], source="teacher"), [group(4, [0, 0])])
    assert list(cb.buffer) == ["p0"] and cb.admissions == 1


def test_graduation_counts_visits() -> None:
    cb = ReplayGraduationCallback()
    assert cb.observe(problem(0), 0.0, 0) == ["admitted"]
    assert cb.observe(problem(0), 0.25, 1) == []  # still hard: stays, one visit
    assert cb.buffer["p0"].visits == 1
    assert cb.observe(problem(0), 0.5, 2) == ["graduated"]
    assert not cb.buffer and cb.graduations == 1 and cb.graduation_visits == 2
    assert cb.observe(problem(1), 0.75, 3) == []  # easy and unknown: nothing happens


def test_fifo_eviction_beyond_capacity() -> None:
    cb = ReplayGraduationCallback(capacity=3)
    for i in range(5):
        cb.observe(problem(i), 0.0, i)
    cb.observe(problem(2), 0.0, 5)  # a visit does not move an entry to the back
    assert list(cb.buffer) == ["p2", "p3", "p4"]
    assert (cb.admissions, cb.evictions) == (5, 2)


def buffered(seed: int, n: int = 20) -> ReplayGraduationCallback:
    cb = ReplayGraduationCallback(replay_ratio=0.25, seed=seed)
    for i in range(100, 100 + n):
        cb.observe(problem(i), 0.0, 0)
    return cb


def replayed_ids(cb: ReplayGraduationCallback, new: list[int]) -> list[str]:
    plan = plan_of(new)
    cb.on_rollout_plan(None, plan)
    assert all(s.kind == "plain" for s in plan.prompts[len(new) :])
    return [s.problem.problem_id for s in plan.prompts[len(new) :]]


def test_replay_draws_count_and_are_uniform_and_seeded() -> None:
    cb = buffered(seed=3)
    drawn = replayed_ids(cb, [0, 1, 2, 3, 4, 5, 100])  # 7 new: round(1.75) = 2; p100 is already planned
    assert len(drawn) == len(set(drawn)) == 2 and "p100" not in drawn
    counts: Counter[str] = Counter()
    for _ in range(2000):
        counts.update(replayed_ids(cb, list(range(8))))  # round(2.0) = 2
    assert sum(counts.values()) == 4000 and len(counts) == 20
    assert 140 < min(counts.values()) and max(counts.values()) < 260  # 200 each if uniform
    def draws(cb: ReplayGraduationCallback) -> list[list[str]]:
        return [replayed_ids(cb, list(range(8))) for _ in range(5)]

    assert draws(buffered(seed=3)) == draws(buffered(seed=3)) != draws(buffered(seed=4))


def test_rounding_is_half_up_and_nothing_to_replay_is_fine() -> None:
    cb = ReplayGraduationCallback(replay_ratio=0.25)
    plan = plan_of([0, 1])
    cb.on_rollout_plan(None, plan)  # empty buffer
    assert len(plan.prompts) == 2
    for i in range(10, 14):
        cb.observe(problem(i), 0.0, 0)
    plan = plan_of([0, 1])  # 0.5 rounds up to 1
    cb.on_rollout_plan(None, plan)
    assert len(plan.prompts) == 3


# ----------------------------------------------------------------------------- BCQ / NCQ


class FakeEngine:
    """Answers every prompt with fixed texts (bytes as token ids)."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.calls: list[tuple[list[str], int]] = []

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingConfig) -> list[list[Completion]]:
        texts = [bytes(p).decode() for p in prompts]
        self.calls.append((texts, n))
        return [[Completion(list(a.encode()), [0.0] * len(a)) for a in self.answers[t][:n]] for t in texts]


def fake_trainer(engine: FakeEngine) -> Any:
    tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens=True: bytes(ids).decode())
    module = SimpleNamespace(tokenize=lambda text: list(text.encode()), tokenizer=tokenizer, teacher=object())
    data = SimpleNamespace(teacher_sampling=SamplingConfig(), engine_for=lambda model: engine)
    return SimpleNamespace(lightning_module=module, datamodule=data)


def test_bcq_only_with_a_correct_teacher_response() -> None:
    engine = FakeEngine({"0+1=?\n": ["\\boxed{1}", "\\boxed{9}"], "1+1=?\n": ["\\boxed{3}", "\\boxed{4}"]})
    cb = ReplayGraduationCallback(augment_ratio=1.0, teacher_samples=2)
    plan = plan_of([0, 1, 2, 3])
    cb.on_rollout_plan(None, plan)  # cap = round(1.0 * 4) = 4
    groups = [
        group(0, [0, 0], texts=["\\boxed{7}", "\\boxed{8}"]),
        group(1, [1, 0, 0, 0], texts=["\\boxed{2}", "\\boxed{5}", "\\boxed{6}", "x"]),
        group(2, [1, 1]),  # easy: no teacher, no reformulation
    ]
    specs = cb.on_rollout_augment(fake_trainer(engine), plan, groups)
    assert [(s.problem.problem_id, s.kind) for s in specs] == [("p0", "bcq"), ("p0", "ncq"), ("p1", "ncq")]
    assert engine.calls == [(["0+1=?\n", "1+1=?\n"], 2)]  # hard problems only, G_T each
    bcq = specs[0].student_prompt
    assert bcq.startswith("0+1=?\nTwo candidate responses follow.")
    assert "\\boxed{1}" in bcq and ("\\boxed{7}" in bcq or "\\boxed{8}" in bcq) and "\\boxed{9}" not in bcq
    assert "correct" not in bcq.split("references.")[1]  # the candidates are unlabelled
    assert "wrong: 5, 6." in specs[2].student_prompt


def test_bcq_candidate_order_is_random_and_seeded() -> None:
    engine = FakeEngine({"0+1=?\n": ["\\boxed{1}"] * 4})
    firsts = []
    for t in range(40):
        cb = ReplayGraduationCallback(augment_ratio=1.0, ncq=False, seed=t)
        plan = plan_of([0])
        cb.on_rollout_plan(None, plan)
        (spec,) = cb.on_rollout_augment(fake_trainer(engine), plan, [group(0, [0, 0], texts=["\\boxed{5}"] * 2)])
        firsts.append(spec.student_prompt.index("\\boxed{1}") < spec.student_prompt.index("\\boxed{5}"))
    assert 5 < sum(firsts) < 35


def test_ncq_lists_deduplicated_answers_and_every_wrong_rollout() -> None:
    wrong = ["1+1=3\n\\boxed{3}", "\\boxed{03}", "no answer", "\\boxed{ 4 }"]
    assert wrong_answers(wrong) == ["3", "4"]
    text = build_ncq("1+1=?\n", wrong)
    assert text.startswith("1+1=?\nThe following answers are all wrong: 3, 4.\n")
    for i, w in enumerate(wrong, start=1):
        assert f"Candidate {i}:\n{w}\n" in text
    assert "all wrong" not in build_ncq("1+1=?", ["no answer"])


def test_templates_and_compressor() -> None:
    templates = ReformulationTemplates(bcq="{problem}|{candidates}", candidate="<{text}>")
    assert build_bcq("Q\n", "c", "w", correct_first=True, templates=templates) == "Q|<c><w>"
    assert build_bcq("Q", "c", "w", correct_first=False, templates=templates) == "Q|<w><c>"
    with pytest.raises(ValueError, match="templates.ncq"):
        ReformulationTemplates(ncq="{problem}{candidates}")
    cut = TruncateCandidates(max_lines=3, max_chars=None)
    assert cut("a\nb\nc\nd\n\\boxed{1}") == "a\nb\n\\boxed{1}"
    assert TruncateCandidates(max_lines=None, max_chars=12)("aaaa\nbbbb\n\\boxed{1}") == "aa\n\\boxed{1}"
    with pytest.raises(ValueError, match="compressor.max_lines"):
        TruncateCandidates(max_lines=0)


def test_augmentation_cap_hardest_first_and_bcq_wins_the_last_slot() -> None:
    rates = [0.25, 0.0, 0.125, 0.375]
    ready = [True] * 4
    assert augmentation_order(rates, ready, ready, 3) == [(1, "bcq"), (1, "ncq"), (2, "bcq")]
    assert augmentation_order(rates, [False, False, True, True], ready, 3) == [(1, "ncq"), (2, "bcq"), (2, "ncq")]
    # Only the cap hardest problems are candidates, even when they cannot fill the cap.
    assert augmentation_order(rates, [False, False, False, True], ready, 2) == [(1, "ncq"), (2, "ncq")]
    assert augmentation_order(rates, ready, ready, 0) == []


# ----------------------------------------------------------------------------- loss pieces


def test_reinforce_pp_zero_spread_groups_get_exactly_zero() -> None:
    rewards = torch.tensor([1.0, 1, 0, 0, 1, 0, 0, 0, 1, 1, 1, 0])
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 4, 4])
    adv = reinforce_pp_advantages(rewards, ids)
    assert torch.equal(adv[:4], torch.zeros(4)) and torch.equal(adv[6:8], torch.zeros(2))
    kept = adv[[4, 5, 8, 9, 10, 11]]
    assert kept.mean().abs() < 1e-6 and (kept.std(correction=0) - 1).abs() < 1e-4
    assert torch.equal(torch.sign(adv), torch.sign(group_advantages(rewards, ids, scale_by_std=False)))
    assert torch.equal(reinforce_pp_advantages(torch.ones(4), torch.tensor([0, 0, 1, 1])), torch.zeros(4))


def test_asymmetric_and_dual_clip_on_hand_made_ratios() -> None:
    ratios = torch.tensor([0.5, 1.0, 1.2, 1.5, 0.5, 1.5, 20.0])
    adv = torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
    logp = ratios.log().requires_grad_()
    loss = clipped_policy_loss(logp, torch.zeros(7), adv, clip_low=0.2, clip_high=0.28, dual_clip=10.0)
    # A > 0: gain capped at ratio 1.28; A < 0: floor at 0.8, then the dual clip caps at c = 10.
    assert torch.allclose(loss, torch.tensor([-0.5, -1.0, -1.2, -1.28, 0.8, 1.5, 10.0]))
    loss.sum().backward()
    assert torch.equal(logp.grad != 0, torch.tensor([True, True, True, False, False, True, False]))


# ----------------------------------------------------------------------------- data module


def test_new_data_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="data.ppo_minibatches"):
        make_data(ppo_minibatches=0)
    with pytest.raises(ValueError, match="data.advantage_estimator"):
        make_data(advantage_estimator="ppo")
    with pytest.raises(ValueError, match="ReplayGraduationCallback.capacity"):
        ReplayGraduationCallback(capacity=0)
    with pytest.raises(ValueError, match="ReplayGraduationCallback.graduation_threshold"):
        ReplayGraduationCallback(graduation_threshold=0.0)


def test_split_keeps_every_row_once_and_shares_scalars() -> None:
    data = make_data(ppo_minibatches=3)
    rows = 7
    batch = {
        "input_ids": torch.arange(rows)[:, None], "kinds": list("abcdefg"), "source": "student", "extra": torch.ones(1)
    }
    parts = data._split(batch, rollout_index=4)
    assert [p["input_ids"].shape[0] for p in parts] == [3, 2, 2]
    assert sorted(torch.cat([p["input_ids"][:, 0] for p in parts]).tolist()) == list(range(rows))
    for p in parts:
        assert p["kinds"] == [batch["kinds"][i] for i in p["input_ids"][:, 0].tolist()]
        assert p["source"] == "student" and p["extra"] is batch["extra"]
    assert [p["kinds"] for p in data._split(batch, 4)] == [p["kinds"] for p in parts]
    with pytest.raises(RuntimeError, match="data.ppo_minibatches"):
        make_data(ppo_minibatches=8)._split(batch, 0)


class BatchLog(Callback):
    def __init__(self) -> None:
        self.batches: list[dict[str, Any]] = []
        self.steps: list[int] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.batches.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        self.steps.append(trainer.global_step)


def fake_verifier(monkeypatch: pytest.MonkeyPatch) -> None:
    """A random tiny model never solves a problem; reward odd-length responses instead, so groups
    have a spread (non-zero advantages), problems graduate and random teachers enable BCQ."""
    reward = lambda text, answer: float(len(text) % 2)  # noqa: E731
    monkeypatch.setattr("lit_zpd.rollout.datamodule.score_response", reward)
    monkeypatch.setattr("lit_zpd.callbacks.replay_graduation.score_response", reward)


def test_ppo_minibatches_serve_one_rollout_over_several_steps(
    tiny_student: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_verifier(monkeypatch)
    module = DistillModule(
        student=tiny_student, teacher=None, loss=LossConfig(policy=1.0, sft=0.0), report_start_end=False
    )
    data = make_data(ppo_minibatches=2, advantage_estimator="reinforce_pp")
    log = BatchLog()
    make_trainer(4, [log]).fit(module, datamodule=data)
    b = log.batches
    assert [x["batch_index"] for x in b] == [0, 1, 2, 3] and log.steps == [0, 1, 2, 3]
    served = [(x["rollout_index"], x["minibatch_index"], x["policy_version"]) for x in b]
    assert served == [(0, 0, 0), (0, 1, 0), (1, 0, 2), (1, 1, 2)]  # minibatch k lags k steps by design
    assert [x["input_ids"].shape[0] for x in b] == [3, 3, 3, 3]  # 3 prompts x G=2 rows, split in two
    # The two minibatches of a rollout are one rollout: its 3 problems, each G times.
    problems = Counter(b[0]["problem_ids"] + b[1]["problem_ids"])
    assert sorted(problems.values()) == [2, 2, 2] and set(problems) == {p.problem_id for p in data.problems_for(0)}
    rows = torch.cat([b[0]["group_index"], b[1]["group_index"]])
    rewards = torch.cat([b[0]["rewards"], b[1]["rewards"]])
    advantages = torch.cat([b[0]["advantages"], b[1]["advantages"]])
    assert torch.allclose(advantages, reinforce_pp_advantages(rewards, rows))
    assert advantages.abs().sum() > 0  # the minibatch policy-gradient path is exercised


# ----------------------------------------------------------------------------- Trainer runs


class WeightHook(Callback, RolloutHook):
    """Another rollout hook on the same trainer; ZPPO must not depend on it or break it."""

    def on_rollout_scored(self, trainer: Any, plan: RolloutPlan, groups: list[RolloutGroup]) -> None:
        for g in groups:
            g.weights = [0.5] * len(g.weights)


def zppo_module(student: str, teacher: str | None) -> DistillModule:
    return DistillModule(
        student=student, teacher=teacher, report_start_end=False,
        loss=LossConfig(policy=1.0, sft=0.0, clip_low=0.2, clip_high=0.28, dual_clip=10.0, aggregation="token"),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
    )


def test_trainer_run_logs_replay_metrics_and_rolls_out_ncq(
    tiny_student: str, tiny_teacher: str, tmp_path: Path
) -> None:
    cb = ReplayGraduationCallback(augment_ratio=0.5, teacher_samples=2, histogram_every_n_steps=1)
    log = BatchLog()
    trainer = Trainer(
        max_steps=2, logger=TensorBoardLogger(tmp_path, name="zppo"), log_every_n_steps=1, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[WeightHook(), cb, log],
    )
    trainer.fit(zppo_module(tiny_student, tiny_teacher), datamodule=make_data(advantage_estimator="reinforce_pp"))
    # A random student solves nothing: every problem is hard, admitted, and gets an NCQ (cap 2);
    # a random teacher solves nothing either, so there is no BCQ.
    first, second = log.batches
    assert first["kinds"].count("ncq") == 2 * 2 and "bcq" not in first["kinds"]
    assert second["input_ids"].shape[0] == (3 + 1 + 2) * 2  # new, round(0.75) replayed, NCQ; G = 2
    assert torch.equal(first["weights"], torch.full_like(first["weights"], 0.5))
    assert cb.admissions == len(cb.buffer) == 6
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    expected = {"replay/buffer_size", "replay/admissions", "replay/step_ncq", "replay/step_replayed"}
    assert expected <= set(events.Tags()["scalars"])
    assert "replay/age" in events.Tags()["histograms"]
    # The decoded samples of step 0 include an NCQ row with its reformulated prompt.
    (sample_text,) = events.Tensors("rollout/samples_student/text_summary")
    text = sample_text.tensor_proto.string_val[0].decode()
    assert "(ncq, reward" in text and "Now solve the problem." in text  # the NCQ template


def test_bcq_needs_a_teacher(tiny_student: str) -> None:
    with pytest.raises(ValueError, match="bcq needs a teacher"):
        make_trainer(1, [ReplayGraduationCallback()]).fit(zppo_module(tiny_student, None), datamodule=make_data())


def resumable_run(
    student: str, teacher: str, steps: int, root: Path, ckpt_path: str | None = None
) -> tuple[DistillModule, ReplayGraduationCallback, BatchLog]:
    seed_everything(0)
    cb = ReplayGraduationCallback(capacity=1, augment_ratio=0.5, teacher_samples=2)
    log = BatchLog()
    trainer = Trainer(
        max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        default_root_dir=root,
        callbacks=[cb, log, ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_top_k=-1, filename="{step}")],
    )
    module = zppo_module(student, teacher)
    data = make_data(ppo_minibatches=2, advantage_estimator="reinforce_pp")
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, cb, log


def test_resume_mid_rollout_matches_uninterrupted_run(
    tiny_student: str, tiny_teacher: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_verifier(monkeypatch)
    full, full_cb, full_log = resumable_run(tiny_student, tiny_teacher, 6, tmp_path / "full")
    _, stopped_cb, _ = resumable_run(tiny_student, tiny_teacher, 3, tmp_path / "first")
    assert stopped_cb.state_dict() != full_cb.state_dict()
    # Step 3 is the second minibatch of rollout 1: the resumed run serves it from the checkpoint.
    resumed, resumed_cb, resumed_log = resumable_run(
        tiny_student, tiny_teacher, 6, tmp_path / "second", str(tmp_path / "first" / "step=3.ckpt")
    )
    assert [b["batch_index"] for b in resumed_log.batches] == [3, 4, 5]
    for a, b in zip(full_log.batches[3:], resumed_log.batches):
        assert a.keys() == b.keys()
        for key in a.keys() - {"sync_seconds"}:  # wall-clock time
            assert torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key], key
    assert full_cb.state_dict() == resumed_cb.state_dict()  # buffer contents, order, counters, RNG
    assert list(full_cb.buffer) == list(resumed_cb.buffer) and full_cb.evictions > 0
    assert any("bcq" in b["kinds"] for b in full_log.batches)
    assert any(b["advantages"].abs().sum() > 0 for b in full_log.batches[3:])
    for (name, a), b in zip(full.student.state_dict().items(), resumed.student.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
