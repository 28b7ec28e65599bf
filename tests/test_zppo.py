"""ZPPO: replay buffer, BCQ/NCQ prompts, REINFORCE++ advantages, clipping, PPO minibatches, resume."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_zpd.callbacks.replay_graduation import ReplayGraduationCallback
from lit_zpd.callbacks.rollout_logging import RolloutLogger
from lit_zpd.losses import clipped_policy_loss, group_advantages, reinforce_pp_advantages
from lit_zpd.module import DistillModule, LossConfig
from lit_zpd.rollout.batch import RolloutBatch, build_batch
from lit_zpd.rollout.context import RolloutContext
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
from tests.conftest import ScriptedEngine
from tests.test_rollout import OddLengthVerifier, make_data, make_trainer

MakeContext = Callable[..., RolloutContext]


def problem(i: int) -> Problem:
    return Problem(problem_id=f"p{i}", prompt=f"{i}+1=?\n", answer=str(i + 1))


def plan_of(ids: list[int], index: int = 0, source: str = "student") -> RolloutPlan:
    prompts = [PromptSpec(problem(i)) for i in ids]
    return RolloutPlan(
        rollout_index=index, policy_version=index, data_source=source, prompts=prompts,  # type: ignore[arg-type]
        drawn=len(ids), drawn_everywhere=frozenset(f"p{i}" for i in ids),
    )


def group(i: int, rewards: list[float], kind: str = "plain", texts: list[str] | None = None) -> RolloutGroup:
    texts = texts or [f"\\boxed{{{i + 1 if r else 0}}}" for r in rewards]
    spec = PromptSpec(problem(i), kind=kind)  # type: ignore[arg-type]
    return RolloutGroup(spec, [[0]] * len(rewards), texts, rewards)


def observe(cb: ReplayGraduationCallback, ctx: RolloutContext, plan: RolloutPlan, groups: list[RolloutGroup]) -> None:
    cb.on_observe(ctx, plan, [g.summary(0, plan.on_policy) for g in groups])


# ----------------------------------------------------------------------------- buffer


def test_admission_only_for_hard_plain_groups(make_context: MakeContext) -> None:
    cb, ctx = ReplayGraduationCallback(), make_context()
    groups = [
        group(0, [0, 0, 0, 1]), group(1, [1, 1, 0, 0]), group(2, [0, 0], kind="bcq"), group(3, [0, 0], kind="ncq")
    ]
    observe(cb, ctx, plan_of([0, 1]), groups)
    assert list(cb.buffer) == ["p0"]  # 0.25 < 0.5 is hard; 0.5 is not; BCQ/NCQ never count
    # On a teacher batch the teacher's rewards say nothing of the student: the tracker's measured
    # pass rate decides (none measured: nothing happens).
    observe(cb, ctx, plan_of([4, 5], source="teacher"), [group(4, [1, 1]), group(5, [1, 1])])
    assert list(cb.buffer) == ["p0"]
    ctx.pass_rates.update("p4", [0.0, 0.0, 1.0, 0.0], step=0)
    ctx.pass_rates.update("p5", [1.0, 1.0, 0.0, 0.0], step=0)
    observe(cb, ctx, plan_of([4, 5], source="teacher"), [group(4, [1, 1]), group(5, [1, 1])])
    assert list(cb.buffer) == ["p0", "p4"] and cb.admissions == 2


def test_graduation_counts_visits() -> None:
    cb = ReplayGraduationCallback()
    assert cb.observe("p0", 0.0, 0) == ["admitted"]
    assert cb.observe("p0", 0.25, 1) == []  # still hard: stays, one visit
    assert cb.buffer["p0"].visits == 1
    assert cb.observe("p0", 0.5, 2) == ["graduated"]
    assert not cb.buffer and cb.graduations == 1 and cb.graduation_visits == 2
    assert cb.observe("p1", 0.75, 3) == []  # easy and unknown: nothing happens


def test_fifo_eviction_beyond_capacity() -> None:
    cb = ReplayGraduationCallback(capacity=3)
    for i in range(5):
        cb.observe(f"p{i}", 0.0, i)
    cb.observe("p2", 0.0, 5)  # a visit does not move an entry to the back
    assert list(cb.buffer) == ["p2", "p3", "p4"]
    assert (cb.admissions, cb.evictions) == (5, 2)


def buffered(seed: int, n: int = 20) -> ReplayGraduationCallback:
    cb = ReplayGraduationCallback(replay_ratio=0.25, seed=seed)
    for i in range(100, 100 + n):
        cb.observe(f"p{i}", 0.0, 0)
    return cb


def replayed_ids(cb: ReplayGraduationCallback, ctx: RolloutContext, new: list[int], index: int = 0) -> list[str]:
    plan = plan_of(new, index)
    cb.on_plan(ctx, plan)
    assert all(s.kind == "plain" and s.replayed for s in plan.prompts[len(new) :])
    return [s.problem.problem_id for s in plan.prompts[len(new) :]]


def test_replay_draws_count_and_are_uniform_and_seeded(make_context: MakeContext) -> None:
    ctx = make_context()
    cb = buffered(seed=3)
    drawn = replayed_ids(cb, ctx, [0, 1, 2, 3, 4, 5, 100])  # 7 new: round(1.75) = 2; p100 is already planned
    assert len(drawn) == len(set(drawn)) == 2 and "p100" not in drawn
    counts: Counter[str] = Counter()
    for index in range(2000):
        counts.update(replayed_ids(cb, ctx, list(range(8)), index))  # round(2.0) = 2
    assert sum(counts.values()) == 4000 and len(counts) == 20
    assert 140 < min(counts.values()) and max(counts.values()) < 260  # 200 each if uniform

    def draws(cb: ReplayGraduationCallback) -> list[list[str]]:
        return [replayed_ids(cb, ctx, list(range(8)), index) for index in range(5)]

    assert draws(buffered(seed=3)) == draws(buffered(seed=3)) != draws(buffered(seed=4))


def test_ranks_replay_disjoint_problems_and_agree_on_the_rest(make_context: MakeContext) -> None:
    cb = buffered(seed=0)
    ranks = [make_context(rank=r, world_size=2) for r in range(2)]
    # Rank 0 drew p0..p3, rank 1 p4..p7, and p100 is buffered but new on rank 1: no rank replays it.
    everywhere = frozenset({*(f"p{i}" for i in range(8)), "p100"})
    drawn = []
    for rank, ctx in enumerate(ranks):
        plan = plan_of([0, 1, 2, 3] if rank == 0 else [4, 5, 6, 7], index=7)
        plan.drawn_everywhere = everywhere
        cb.on_plan(ctx, plan)
        drawn.append({s.problem.problem_id for s in plan.prompts if s.replayed})
    assert len(drawn[0]) == len(drawn[1]) == 1 and not drawn[0] & drawn[1]  # round(0.25 * 4) = 1 each
    assert "p100" not in drawn[0] | drawn[1]


def test_rounding_is_half_up_and_nothing_to_replay_is_fine(make_context: MakeContext) -> None:
    ctx = make_context()
    cb = ReplayGraduationCallback(replay_ratio=0.25)
    plan = plan_of([0, 1])
    cb.on_plan(ctx, plan)  # empty buffer
    assert len(plan.prompts) == 2
    for i in range(10, 14):
        cb.observe(f"p{i}", 0.0, 0)
    plan = plan_of([0, 1])  # 0.5 rounds up to 1
    cb.on_plan(ctx, plan)
    assert len(plan.prompts) == 3


# ----------------------------------------------------------------------------- BCQ / NCQ


def test_bcq_only_with_a_correct_teacher_response(make_context: MakeContext) -> None:
    engine = ScriptedEngine({"0+1=?\n": ["\\boxed{1}", "\\boxed{9}"], "1+1=?\n": ["\\boxed{3}", "\\boxed{4}"]})
    ctx = make_context(engine)
    cb = ReplayGraduationCallback(augment_ratio=1.0, teacher_samples=2)
    plan = plan_of([0, 1, 2, 3])  # cap = round(1.0 * 4) = 4
    groups = [
        group(0, [0, 0], texts=["\\boxed{7}", "\\boxed{8}"]),
        group(1, [1, 0, 0, 0], texts=["\\boxed{2}", "\\boxed{5}", "\\boxed{6}", "x"]),
        group(2, [1, 1]),  # easy: no teacher, no reformulation
    ]
    specs = cb.on_augment(ctx, plan, groups)
    assert [(s.problem.problem_id, s.kind) for s in specs] == [("p0", "bcq"), ("p0", "ncq"), ("p1", "ncq")]
    assert [(texts, n) for texts, n, _ in engine.calls] == [(["0+1=?\n", "1+1=?\n"], 2)]  # hard problems only, G_T each
    bcq = specs[0].student_prompt
    assert bcq.startswith("0+1=?\nTwo candidate responses follow.")
    assert "\\boxed{1}" in bcq and ("\\boxed{7}" in bcq or "\\boxed{8}" in bcq) and "\\boxed{9}" not in bcq
    assert "correct" not in bcq.split("references.")[1]  # the candidates are unlabelled
    assert "wrong: 5, 6." in specs[2].student_prompt


def test_bcq_candidate_order_is_random_and_seeded(make_context: MakeContext) -> None:
    ctx = make_context(ScriptedEngine({"0+1=?\n": ["\\boxed{1}"]}))
    firsts = []
    for t in range(40):
        cb = ReplayGraduationCallback(augment_ratio=1.0, ncq=False, seed=t)
        (spec,) = cb.on_augment(ctx, plan_of([0]), [group(0, [0, 0], texts=["\\boxed{5}"] * 2)])
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
    rows = 7
    groups = [RolloutGroup(PromptSpec(problem(i)), [[5 + i]], [f"t{i}"], [1.0]) for i in range(rows)]
    batch = build_batch(groups, lambda text: [3], pad_token_id=0, source="student")
    batch.metrics = {"replay/step_admitted": 2.0}
    batch.extras = {"per_row": torch.arange(rows), "shared": torch.ones(1)}
    parts = batch.split(3, seed=("run", 4))
    assert [p.size for p in parts] == [3, 2, 2]
    assert [(p.minibatch_index, p.num_minibatches, p.last_minibatch) for p in parts] == [(0, 3, False), (1, 3, False), (2, 3, True)]
    firsts = torch.cat([p.input_ids[:, 1] for p in parts])
    assert sorted(firsts.tolist()) == [5 + i for i in range(rows)]
    for p in parts:
        assert p.problem_ids == [f"p{t - 5}" for t in p.input_ids[:, 1].tolist()]
        assert torch.equal(p.extras["per_row"], p.input_ids[:, 1] - 5)
        assert p.source == "student" and p.extras["shared"] is batch.extras["shared"] and p.metrics is batch.metrics
    assert [p.problem_ids for p in batch.split(3, seed=("run", 4))] == [p.problem_ids for p in parts]
    with pytest.raises(RuntimeError, match="data.ppo_minibatches"):
        batch.split(8, seed=0)


class BatchLog(Callback):
    def __init__(self) -> None:
        self.batches: list[RolloutBatch] = []
        self.steps: list[int] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.batches.append(copy.deepcopy(batch))
        self.steps.append(trainer.global_step)


def test_ppo_minibatches_serve_one_rollout_over_several_steps(tiny_student: str) -> None:
    module = DistillModule(student=tiny_student, teacher=None, loss=LossConfig(policy=1.0, sft=0.0))
    data = make_data(ppo_minibatches=2, advantage_estimator="reinforce_pp", verifier=OddLengthVerifier())
    log = BatchLog()
    make_trainer(4, [log]).fit(module, datamodule=data)
    b = log.batches
    assert [x.batch_index for x in b] == [0, 1, 2, 3] and log.steps == [0, 1, 2, 3]
    served = [(x.rollout_index, x.minibatch_index, x.policy_version) for x in b]
    assert served == [(0, 0, 0), (0, 1, 0), (1, 0, 2), (1, 1, 2)]  # minibatch k lags k steps by design
    assert [x.size for x in b] == [3, 3, 3, 3]  # 3 prompts x G=2 rows, split in two
    # The two minibatches of a rollout are one rollout: its 3 problems, each G times.
    problems = Counter(b[0].problem_ids + b[1].problem_ids)
    drawn = data.pipeline.sampler.draw(0)[0]
    assert sorted(problems.values()) == [2, 2, 2] and set(problems) == {p.problem_id for p in drawn}
    rows = torch.cat([b[0].group_index, b[1].group_index])
    rewards = torch.cat([b[0].rewards, b[1].rewards])
    advantages = torch.cat([b[0].advantages, b[1].advantages])
    assert torch.allclose(advantages, reinforce_pp_advantages(rewards, rows))
    assert advantages.abs().sum() > 0  # the minibatch policy-gradient path is exercised


# ----------------------------------------------------------------------------- Trainer runs


class WeightHook(Callback, RolloutHook):
    """Another rollout hook on the same trainer; ZPPO must not depend on it or break it."""

    def on_weight(self, ctx: Any, plan: RolloutPlan, groups: list[RolloutGroup], summaries: list) -> list[list[float]]:
        return [[0.5] * len(g.weights) for g in groups]


def zppo_module(student: str, teacher: str | None) -> DistillModule:
    return DistillModule(
        student=student, teacher=teacher,
        loss=LossConfig(policy=1.0, sft=0.0, clip_low=0.2, clip_high=0.28, dual_clip=10.0, aggregation="token"),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
    )


def test_trainer_run_logs_replay_metrics_and_rolls_out_ncq(
    tiny_student: str, tiny_teacher: str, tmp_path: Path
) -> None:
    cb = ReplayGraduationCallback(augment_ratio=0.5, teacher_samples=2)
    log = BatchLog()
    trainer = Trainer(
        max_steps=2, logger=TensorBoardLogger(tmp_path, name="zppo"), log_every_n_steps=1, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[WeightHook(), cb, log, RolloutLogger(every_n_steps=1)],
    )
    trainer.fit(zppo_module(tiny_student, tiny_teacher), datamodule=make_data(advantage_estimator="reinforce_pp"))
    # A random student solves nothing: every problem is hard, admitted, and gets an NCQ (cap 2);
    # a random teacher solves nothing either, so there is no BCQ.
    first, second = log.batches
    assert first.kinds.count("ncq") == 2 * 2 and "bcq" not in first.kinds
    assert second.size == (3 + 1 + 2) * 2  # new, round(0.75) replayed, NCQ; G = 2
    assert torch.equal(first.weights, torch.full_like(first.weights, 0.5))
    assert cb.admissions == len(cb.buffer) == 6
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    expected = {"replay/buffer_size", "replay/admissions", "replay/step_ncq", "replay/step_replayed"}
    assert expected <= set(events.Tags()["scalars"])
    assert "replay/age" in events.Tags()["histograms"]
    # The decoded samples of step 0 include an NCQ row with its reformulated prompt.
    sample_text = events.Tensors("rollout/samples_student/text_summary")[0]
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
    data = make_data(ppo_minibatches=2, advantage_estimator="reinforce_pp", verifier=OddLengthVerifier())
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, cb, log


def assert_same_batches(a: RolloutBatch, b: RolloutBatch) -> None:
    """Equal field by field; the wall-clock weight-sync time aside."""
    for name in RolloutBatch.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if name == "metrics":
            x, y = ({k: v for k, v in m.items() if k != "rollout/weight_sync_seconds"} for m in (x, y))
        if name in ("histograms", "extras"):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y), name
        else:
            assert x == y, name


def test_resume_mid_rollout_matches_uninterrupted_run(tiny_student: str, tiny_teacher: str, tmp_path: Path) -> None:
    full, full_cb, full_log = resumable_run(tiny_student, tiny_teacher, 6, tmp_path / "full")
    _, stopped_cb, _ = resumable_run(tiny_student, tiny_teacher, 3, tmp_path / "first")
    assert stopped_cb.state_dict() != full_cb.state_dict()
    # Step 3 is the second minibatch of rollout 1: the resumed run serves it from the checkpoint.
    resumed, resumed_cb, resumed_log = resumable_run(
        tiny_student, tiny_teacher, 6, tmp_path / "second", str(tmp_path / "first" / "step=3.ckpt")
    )
    assert [b.batch_index for b in resumed_log.batches] == [3, 4, 5]
    for a, b in zip(full_log.batches[3:], resumed_log.batches):
        assert_same_batches(a, b)
    assert full_cb.state_dict() == resumed_cb.state_dict()  # buffer contents, order, counters, RNG
    assert list(full_cb.buffer) == list(resumed_cb.buffer) and full_cb.evictions > 0
    assert any("bcq" in b.kinds for b in full_log.batches)
    assert any(b.advantages.abs().sum() > 0 for b in full_log.batches[3:])
    for (name, a), b in zip(full.student.state_dict().items(), resumed.student.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
