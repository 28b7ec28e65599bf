"""OPSD's privileged self-teacher and ATESD's ExposureController: the revealed context, exact
response-token alignment, the controller's policy, reward, update and resume."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_zpd.callbacks.beta_kernel import BetaKernelWeighting
from lit_zpd.callbacks.exposure import FEATURES, Decision, ExposureController, PrivilegedTeacher
from lit_zpd.callbacks.replay_graduation import ReplayGraduationCallback
from lit_zpd.module import DistillModule, LossConfig
from lit_zpd.rollout.plan import RolloutHook
from lit_zpd.tasks.arithmetic import ArithmeticCurriculum
from lit_zpd.tasks.privileged import COMPACT_TEMPLATE, PrivilegedContext
from lit_zpd.tasks.problem import Problem
from tests.probes import StopAtStep
from tests.test_rollout import OddLengthVerifier, make_data, make_trainer

COLUMNS = Problem("p", "694*6=?\n", "4164", reference="4*6+0=24\n9*6+2=56\n6*6+5=41\n\\boxed{4164}")


# ------------------------------------------------------------------------------ privileged context


@pytest.mark.parametrize("ratio, shown", [(0.0, 0), (0.3, 0), (0.34, 1), (0.5, 1), (0.67, 2), (1.0, 3)])
def test_reveal_shows_floor_of_a_times_m_segments_and_always_the_answer(ratio: float, shown: int) -> None:
    context = PrivilegedContext(COMPACT_TEMPLATE, segment_by="lines")
    lines = COLUMNS.reference.split("\n")
    solution = "\n".join([*lines[:shown], lines[-1]])
    assert context.reveal(COLUMNS, ratio) == f"ref:\n{solution}\n694*6=?\n"


def test_opsd_template_puts_problem_and_solution_in_place() -> None:
    text = PrivilegedContext().reveal(COLUMNS, 1.0)
    assert text.startswith("694*6=?\n\n\nHere is a reference solution to this problem:\n4*6+0=24\n")
    assert text.endswith("derives the same final answer to the problem below:\n694*6=?\n")
    assert "\\boxed{4164}" in PrivilegedContext().reveal(COLUMNS, 0.0)


def test_segments_by_paragraph_and_sentence_and_an_answer_the_reference_lacks() -> None:
    problem = Problem("q", "Q?\n", "7", reference="First we add. Then we check.\n\nSo it is seven.")
    paragraphs = PrivilegedContext("{solution}|{problem}", segment_by="blank_lines")
    assert paragraphs.split(problem) == (["First we add. Then we check.", "So it is seven."], "\\boxed{7}")
    assert paragraphs.reveal(problem, 0.5) == "First we add. Then we check.\n\\boxed{7}|Q?\n"
    sentences = PrivilegedContext("{solution}|{problem}", segment_by="sentences")
    assert sentences.split(problem)[0] == ["First we add.", "Then we check.", "So it is seven."]
    # A last line that holds the answer is the answer line.
    gsm = Problem("g", "Q?\n", "72", reference="48/2 = 24\n48+24 = 72\n#### 72")
    assert PrivilegedContext("{solution}|{problem}", segment_by="lines").reveal(gsm, 0.0) == "#### 72|Q?\n"


def test_a_last_line_that_only_contains_the_answer_is_reasoning() -> None:
    context = PrivilegedContext("{solution}|{problem}", segment_by="lines")
    # "5" occurs in "7+8=15" but the line does not state the answer: it stays a reasoning segment.
    tricky = Problem("t", "Q?\n", "5", reference="2+3=5\n7+8=15")
    assert context.split(tricky) == (["2+3=5", "7+8=15"], "\\boxed{5}")
    # A single-paragraph reference is one segment, shown only at a = 1.
    paragraph = Problem("m", "Q?\n", "12", reference="Three fours make twelve, so the answer is 12.")
    blank = PrivilegedContext("{solution}|{problem}", segment_by="blank_lines")
    assert blank.reveal(paragraph, 0.9) == "\\boxed{12}|Q?\n"
    assert blank.reveal(paragraph, 1.0) == "Three fours make twelve, so the answer is 12.\n\\boxed{12}|Q?\n"


def test_bad_context_input_names_what_to_fix() -> None:
    with pytest.raises(ValueError, match="{solution}"):
        PrivilegedContext("{problem} only")
    with pytest.raises(ValueError, match="no reference solution"):
        PrivilegedContext().reveal(Problem("x", "1+1=?\n", "2"), 1.0)
    with pytest.raises(ValueError, match="reveal ratio"):
        PrivilegedContext().reveal(COLUMNS, 1.5)
    with pytest.raises(ValueError, match="reveal_ratio"):
        PrivilegedTeacher(reveal_ratio=-0.1)


@pytest.mark.parametrize("copies", [0.3, 2.0])
def test_curriculum_context_copies_add_partial_references_to_train_only(copies: float) -> None:
    plain = ArithmeticCurriculum(problems_per_level=50)
    source = ArithmeticCurriculum(problems_per_level=50, context_copies=copies)
    extra = [p for p in source.problems("train") if "#context" in p.problem_id]
    assert len(source.problems("train")) == len(plain.problems("train")) + len(extra)
    assert copies - 0.1 < len(extra) / len(plain.problems("train")) < copies + 0.1
    assert source.problems("validation") == plain.problems("validation")
    by_id = {p.problem_id: p for p in plain.problems("train")}
    with_answer = 0
    for p in extra:
        original = by_id[p.problem_id.split("#context")[0]]
        assert p.prompt.startswith("ref:\n") and p.prompt.endswith(original.prompt)
        assert (p.reference, p.answer) == (original.reference, original.answer)
        revealed = p.prompt.removeprefix("ref:\n").removesuffix(original.prompt).strip("\n").split("\n")
        assert original.reference.startswith("\n".join(line for line in revealed if "boxed" not in line))
        with_answer += "\\boxed" in p.prompt
    assert 0.3 < with_answer / len(extra) < 0.7
    if copies == 2.0:  # each copy draws its own k
        assert len({p.prompt for p in extra}) > 1.2 * len(plain.problems("train"))


# ------------------------------------------------------------------------------ alignment in a run


def opsd_module(student: str, **loss: Any) -> DistillModule:
    return DistillModule(student=student, teacher="self_initial", loss=LossConfig(**({"forward_kl": 1.0} | loss)))


def test_teacher_logprobs_in_the_batch_equal_a_separate_forward_of_the_privileged_context(tiny_student: str) -> None:
    module = opsd_module(tiny_student)
    hook = PrivilegedTeacher(reveal_ratio=0.5)
    data = make_data(prompts_per_step=4, samples_per_prompt=2)
    make_trainer(1, [hook]).fit(module, datamodule=data)
    batch = data.rollout(1)
    context = data.source.privileged_context()
    # Prompts of different lengths on both sides, so rows pad differently.
    assert len({len(p) for p in batch.prompts}) > 1
    from_batch = module.teacher_token_logprobs(batch)
    separate = []
    tokenize = data.context.tokenize
    with torch.no_grad():
        for row, pid in enumerate(batch.problem_ids):
            prompt = tokenize(context.reveal(data.context.problem(pid), 0.5))
            response = batch.input_ids[row][batch.response_mask[row].bool()].tolist()
            logits = module.teacher(input_ids=torch.tensor([prompt + response])).logits[0, :, : len(module.tokenizer)]
            at = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
            separate.append(torch.log_softmax(logits[at], -1).gather(-1, torch.tensor(response)[:, None])[:, 0])
    torch.testing.assert_close(from_batch, torch.cat(separate), atol=1e-5, rtol=1e-5)
    # The student's rows carry no context; the teacher's carry the reveal of their own problem.
    assert all(not p.startswith("ref:") for p in batch.prompts)
    assert not torch.equal(batch.teacher_input_ids, batch.input_ids)


class Terms(Callback):
    def __init__(self) -> None:
        self.terms: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.terms.append({k: float(v) for k, v in outputs["terms"].items()})


def test_opsd_recipe_trains_and_reports_the_unclipped_mismatch(tiny_student: str) -> None:
    # A clip small enough to bind on the near-uniform distributions of a random tiny model.
    clipped = opsd_module(tiny_student, entry_clip=1e-4, temperature=1.1)
    terms = Terms()
    data = make_data()
    make_trainer(2, [PrivilegedTeacher(), terms]).fit(clipped, datamodule=data)
    assert len(terms.terms) == 2
    assert all(math.isfinite(t["forward_kl"]) and t["forward_kl"] < t["forward_kl_unclipped"] for t in terms.terms)
    # On one batch: the unclipped diagnostic is the divergence of the same loss without the clip,
    # and the clip binds.
    batch = data.rollout(2)
    unclipped = opsd_module(tiny_student, temperature=1.1)
    unclipped.student.load_state_dict(clipped.student.state_dict())
    unclipped.teacher.load_state_dict(clipped.teacher.state_dict())
    with torch.no_grad():
        values, diagnostics = clipped.loss_terms(batch)
        reference, _ = unclipped.loss_terms(batch)
    torch.testing.assert_close(diagnostics["forward_kl_unclipped"], reference["forward_kl"])
    assert values["forward_kl"] < 0.5 * reference["forward_kl"]


def test_a_privileged_context_set_by_an_undeclared_hook_is_an_error(tiny_student: str) -> None:
    class Sneaky(Callback, RolloutHook):
        def on_plan(self, ctx: Any, plan: Any) -> None:
            plan.prompts[0].teacher_prompt = "ref:\n" + plan.prompts[0].student_prompt

    with pytest.raises(RuntimeError, match="teacher_context"):
        make_trainer(1, [Sneaky()]).fit(opsd_module(tiny_student), datamodule=make_data())


def test_problems_without_a_reference_are_named_at_setup(tiny_student: str) -> None:
    class NoReference(ArithmeticCurriculum):
        def problems(self, split: str) -> list[Problem]:
            rows = super().problems(split)
            return [replace(rows[0], reference=None), *rows[1:]] if split == "train" else rows

    data = make_data(source=NoReference(problems_per_level=20, max_eval_per_skill=2))
    with pytest.raises(ValueError, match="has no reference solution"):
        make_trainer(1, [PrivilegedTeacher()]).fit(opsd_module(tiny_student), datamodule=data)


def test_two_privileged_hooks_conflict_at_setup(tiny_student: str) -> None:
    with pytest.raises(ValueError, match="teacher_context"):
        make_trainer(1, [PrivilegedTeacher(), ExposureController()]).fit(opsd_module(tiny_student), datamodule=make_data())


def test_a_privileged_teacher_needs_a_teacher(tiny_student: str) -> None:
    module = DistillModule(student=tiny_student, teacher=None, loss=LossConfig(sft=1.0))
    with pytest.raises(ValueError, match="model.teacher"):
        make_trainer(1, [PrivilegedTeacher()]).fit(module, datamodule=make_data(data_source="reference"))


# ------------------------------------------------------------------------------ the controller


def test_beta_parameters_are_above_one_for_any_state() -> None:
    controller = ExposureController()
    states = torch.cat([torch.randn(64, len(FEATURES)) * 100, torch.zeros(1, len(FEATURES))])
    policy = controller.distribution(states)
    assert (policy.concentration1 > 1).all() and (policy.concentration0 > 1).all()
    assert torch.isfinite(policy.log_prob(torch.full((65,), 0.5))).all()


def test_discounted_learning_progress_on_a_hand_made_loss_sequence() -> None:
    controller = ExposureController(lookahead=3, gamma=0.5, lambda_gt=0.1)
    controller.losses = {4: 5.0, 5: 4.0, 6: 4.5, 7: 3.0, 8: 0.0}
    decision = Decision(index=0, start=4, features=[0.0] * 6, sample=0.5, ratio=0.5, teacher_logprobs=[-2.0, -1.0])
    g_lp, g_gt = controller.reward(decision)
    # 1 * (5 - 4) + 0.5 * max(0, 4 - 4.5) + 0.25 * (4.5 - 3); step 8 lies past the look-ahead.
    assert g_lp == pytest.approx(1.375)
    # Discounted mean of the held steps' teacher log-probs: (-2 + 0.5 * -1) / 1.5.
    assert g_gt == pytest.approx(-2.5 / 1.5)
    assert ExposureController(mode="one_step").lookahead == 1


def test_one_reinforce_step_moves_the_policy_toward_the_better_ratio() -> None:
    controller = ExposureController(lr=1e-2, entropy_coef=0.0)
    features = [0.5, 0.5, 1.0, 0.2, 1.0, 0.6]
    samples = [0.1, 0.3, 0.5, 0.7, 0.9, 0.2, 0.4, 0.8]
    # A toy reward that prefers high exposure: the learning progress equals the ratio.
    completed = [(Decision(i, 0, features, a, a), a, 0.0) for i, a in enumerate(samples)]
    state = torch.tensor(features)
    before = controller.distribution(state).mean.item()
    controller.update(completed)
    after = controller.distribution(state).mean.item()
    assert after > before + 1e-4
    # The opposite preference moves it the other way.
    controller = ExposureController(lr=1e-2, entropy_coef=0.0)
    controller.update([(d, -g, 0.0) for d, g, _ in completed])
    assert controller.distribution(state).mean.item() < before - 1e-4


def test_entropy_penalty_is_one_sided() -> None:
    controller = ExposureController(entropy_coef=1.0, lr=1e-2)
    same = [(Decision(i, 0, [0.0] * 6, 0.5, 0.5), 1.0, 0.0) for i in range(4)]  # no advantage signal
    state = torch.zeros(6)
    entropy = controller.distribution(state).entropy().item()
    assert entropy > controller.entropy_target  # the initial policy is flatter than Beta(2, 2)
    controller.update(same)
    assert controller.distribution(state).entropy().item() < entropy
    # Below the target the penalty is 0 and nothing moves.
    low = ExposureController(entropy_coef=1.0, entropy_target=10.0)
    weights = [p.clone() for p in low.policy.parameters()]
    low.update(same)
    assert all(torch.equal(a, b) for a, b in zip(weights, low.policy.parameters()))


class Ratios(Callback):
    def __init__(self) -> None:
        self.rows: list[tuple[int, float]] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.rows.append((trainer.global_step, batch.metrics["exposure/reveal_ratio"]))


def controller_run(
    student: str, tmp_path: Path, steps: int, stop_at: int | None = None, ckpt: str | None = None,
    data: dict[str, Any] | None = None, **kw: Any,
) -> tuple[ExposureController, Ratios, DistillModule]:
    controller = ExposureController(**({"hold_steps": 2, "lookahead": 2, "decisions_per_update": 2, "probe_size": 4} | kw))
    ratios = Ratios()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    callbacks: list[Callback] = [controller, ratios, checkpoint, *([StopAtStep(stop_at)] if stop_at else [])]
    module = DistillModule(
        student=student, teacher="self_initial", loss=LossConfig(forward_kl=1.0),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
    )
    trainer = Trainer(
        max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, default_root_dir=tmp_path, callbacks=callbacks,
    )
    trainer.fit(module, datamodule=make_data(**({"prompts_per_step": 2} | (data or {}))), ckpt_path=ckpt)
    return controller, ratios, module


def _plain(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.tolist()
    if isinstance(state, dict):
        return {k: _plain(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return [_plain(v) for v in state]
    return state


def test_controller_learns_in_a_run_and_resumes_exactly(tiny_student: str, tmp_path: Path) -> None:
    full, full_ratios, full_module = controller_run(tiny_student, tmp_path / "full", 10)
    assert full.updates >= 2 and full.decisions_made == 5
    assert len({r for _, r in full_ratios.rows}) > 1  # sampled, not fixed
    assert [r for _, r in full_ratios.rows][::2] == [r for _, r in full_ratios.rows][1::2]  # held for 2 steps
    controller_run(tiny_student, tmp_path / "first", 10, stop_at=5)
    resumed, resumed_ratios, resumed_module = controller_run(tiny_student, tmp_path / "resumed", 10, ckpt=str(tmp_path / "first" / "step=5.ckpt"))
    assert resumed_ratios.rows == full_ratios.rows[5:]
    assert _plain(resumed.state_dict()) == _plain(full.state_dict())
    for a, b in zip(full_module.student.parameters(), resumed_module.student.parameters()):
        assert torch.equal(a, b)


def test_controller_resumes_exactly_between_minibatches_of_one_rollout(tiny_student: str, tmp_path: Path) -> None:
    """Step 5 is the second minibatch of rollout 2: it is served from the checkpoint, not planned,
    and the controller must still record its loss and probe."""
    data = {"ppo_minibatches": 2}
    full, full_ratios, _ = controller_run(tiny_student, tmp_path / "full", 8, data=data)
    controller_run(tiny_student, tmp_path / "first", 8, stop_at=5, data=data)
    resumed, resumed_ratios, _ = controller_run(tiny_student, tmp_path / "resumed", 8, ckpt=str(tmp_path / "first" / "step=5.ckpt"), data=data)
    assert resumed_ratios.rows == full_ratios.rows[5:]
    assert _plain(resumed.state_dict()) == _plain(full.state_dict())
    assert full.updates >= 1


@pytest.mark.parametrize("kw", [{"progress_loss": "train_loss"}, {"mode": "one_step"}])
def test_training_loss_progress_and_one_step_reward_learn_in_a_run(tiny_student: str, tmp_path: Path, kw: dict[str, Any]) -> None:
    controller, ratios, _ = controller_run(tiny_student, tmp_path, 10, **kw)
    assert controller.updates >= 2
    assert len({r for _, r in ratios.rows}) > 1
    # Only the losses the unfinished decisions need are kept (hold 2, look-ahead <= 2).
    assert len(controller.losses) <= 5


def test_gradient_accumulation_is_refused(tiny_student: str) -> None:
    trainer = make_trainer(2, [ExposureController()], accumulate_grad_batches=2)
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        trainer.fit(opsd_module(tiny_student), datamodule=make_data())


@pytest.mark.parametrize("mode", ["fixed", "random"])
def test_ablation_modes_measure_rewards_without_learning(tiny_student: str, tmp_path: Path, mode: str) -> None:
    controller, ratios, _ = controller_run(tiny_student, tmp_path, 8, mode=mode, reveal_ratio=0.25)
    assert controller.updates == 0
    weights = controller.distribution(torch.zeros(6))
    assert torch.isfinite(weights.mean)
    values = {r for _, r in ratios.rows}
    assert values == {0.25} if mode == "fixed" else len(values) > 1 and all(0.05 <= r <= 1 for r in values)


def test_controller_stacks_with_replay_and_weighting(tiny_student: str) -> None:
    controller = ExposureController(hold_steps=1, lookahead=1, decisions_per_update=2, probe_size=2)
    replay = ReplayGraduationCallback()
    weighting = BetaKernelWeighting()
    seen: list[Any] = []

    class Keep(Callback):
        def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            seen.append(batch)

    module = DistillModule(student=tiny_student, teacher="self_initial", loss=LossConfig(forward_kl=1.0, policy=1.0))
    data = make_data(verifier=OddLengthVerifier(), samples_per_prompt=4, prompts_per_step=4)
    make_trainer(5, [controller, replay, weighting, Keep()]).fit(module, datamodule=data)
    assert controller.updates >= 1 and replay.admissions > 0
    assert any((b.weights != 1).any() for b in seen)
    for batch in seen:
        plain_rows = [i for i, kind in enumerate(batch.kinds) if kind == "plain"]
        reformulated = [i for i, kind in enumerate(batch.kinds) if kind != "plain"]
        student = [ids[mask.bool()].tolist() for ids, mask in zip(batch.input_ids, batch.attention_mask)]
        teacher = [ids[mask.bool()].tolist() for ids, mask in zip(batch.teacher_input_ids, batch.teacher_attention_mask)]
        assert all(teacher[i] != student[i] for i in plain_rows)
        assert all(teacher[i] == student[i] for i in reformulated)
    assert any(kind != "plain" for batch in seen for kind in batch.kinds)
