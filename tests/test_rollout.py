"""The rollout pipeline: zero policy lag, determinism, data sources, the sampler, the hook phases
and their controls, verifiers."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from lit_zpd.losses import token_logprobs
from lit_zpd.module import DistillModule, LossConfig
from lit_zpd.rollout.datamodule import RolloutDataModule
from lit_zpd.rollout.engine import SamplingConfig
from lit_zpd.rollout.plan import DrawRequest, PromptSpec, RolloutHook
from lit_zpd.rollout.sampler import ProblemSampler
from lit_zpd.tasks.arithmetic import ArithmeticCurriculum
from lit_zpd.tasks.verifier import Verifier


class OddLengthVerifier(Verifier):
    """A random tiny model never solves a problem: reward odd-length responses instead, so groups
    have a reward spread (non-zero advantages) and problems graduate."""

    def extract(self, response: str) -> str | None:
        return response

    def score(self, response: str, answer: str) -> float:
        return float(len(response) % 2)


def make_data(verifier: Verifier | None = None, **kwargs: Any) -> RolloutDataModule:
    defaults: dict[str, Any] = dict(
        source=ArithmeticCurriculum(problems_per_level=20, max_eval_per_skill=2, verifier=verifier or "boxed"),
        prompts_per_step=3,
        samples_per_prompt=2,
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=8),
        eval_samples=0,
        eval_sampling=SamplingConfig(max_new_tokens=8),
    )
    return RolloutDataModule(**(defaults | kwargs))


def make_trainer(steps: int, callbacks: list[Callback] | None = None, **kwargs: Any) -> Trainer:
    return Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=callbacks or [],
        **kwargs,
    )


def recompute_logprobs(module: DistillModule, batch: dict[str, Any], student: torch.nn.Module) -> torch.Tensor:
    """Log-probs of the batch's response tokens under ``student`` at the sampling temperature."""
    with torch.no_grad():
        logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    mask = batch.response_mask[:, 1:].bool()
    vocab = len(module.tokenizer)
    return token_logprobs(logits[:, :-1][mask][:, :vocab], batch.input_ids[:, 1:][mask], batch.sampling_temperature)


class LagProbe(Callback):
    """Records, before every training step, how the batch's sampling log-probs compare with the
    current weights and with the weights of one step earlier."""

    def __init__(self) -> None:
        self.versions: list[tuple[int, int]] = []
        self.current_error: list[float] = []
        self.stale_error: list[float] = []
        self._previous: dict[str, torch.Tensor] | None = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.versions.append((batch.policy_version, trainer.global_step))
        sampled = batch.sampling_logprobs[:, 1:][batch.response_mask[:, 1:].bool()]
        self.current_error.append((recompute_logprobs(pl_module, batch, pl_module.student) - sampled).abs().max().item())
        if self._previous is not None:
            current = {k: v.clone() for k, v in pl_module.student.state_dict().items()}
            pl_module.student.load_state_dict(self._previous)
            stale = recompute_logprobs(pl_module, batch, pl_module.student)
            pl_module.student.load_state_dict(current)
            self.stale_error.append((stale - sampled).abs().max().item())
        self._previous = {k: v.clone() for k, v in pl_module.student.state_dict().items()}


def fast_moving_student(student: str) -> DistillModule:
    """A student whose every step moves its log-probs visibly (SGD, large lr): stale weights show."""
    return DistillModule(
        student=student,
        teacher=None,
        loss=LossConfig(policy=1.0, sft=1.0),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
    )


def test_zero_policy_lag(tiny_student: str) -> None:
    """Rollouts for step t are sampled by the weights after step t-1, not by older ones."""
    module = fast_moving_student(tiny_student)
    probe = LagProbe()
    make_trainer(4, [probe]).fit(module, datamodule=make_data())
    assert probe.versions == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert max(probe.current_error) < 1e-4
    # The probe can tell stale weights apart: the previous step's weights give other log-probs.
    assert min(probe.stale_error) > 1e-3


def test_rollout_is_a_function_of_the_batch_index(tiny_student: str) -> None:
    module = DistillModule(student=tiny_student, teacher=None)
    data = make_data()
    trainer = make_trainer(1)
    trainer.fit(module, datamodule=data)  # attaches module and data to the trainer
    first, again, other = data.rollout(5), data.rollout(5), data.rollout(6)
    assert torch.equal(first.input_ids, again.input_ids)
    assert first.problem_ids == again.problem_ids
    assert first.problem_ids != other.problem_ids
    assert torch.equal(first.group_index, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert (first.rollout_index, first.batch_index, first.minibatch_index, first.num_minibatches) == (5, 5, 0, 1)


def test_sampler_covers_the_train_split_each_epoch_and_ranks_are_disjoint() -> None:
    problems = ArithmeticCurriculum(problems_per_level=20).problems("train")
    sampler = ProblemSampler(problems, prompts_per_step=7, seed=0)
    single = [p.problem_id for r in range(len(problems) // 7) for p in sampler.draw(r)[0]]
    assert len(single) == len(set(single))
    # Two ranks draw disjoint problems; together they walk the same epoch as one process drawing twice as many.
    two = [sampler.draw(r, world_size=2) for r in range(len(problems) // 14)]
    assert all(not {p.problem_id for p in a} & {p.problem_id for p in b} for a, b in two)
    wide = ProblemSampler(problems, prompts_per_step=14, seed=0)
    assert [p.problem_id for a, b in two[:3] for p in a + b] == [p.problem_id for r in range(3) for p in wide.draw(r)[0]]
    # One process draws what rank 0 of one process always drew.
    assert sampler.draw(3)[0] == sampler.draw(3, world_size=1)[0]


def test_sampler_restriction_and_weighting_are_seeded_and_sharded() -> None:
    problems = ArithmeticCurriculum(problems_per_level=20).problems("train")
    sampler = ProblemSampler(problems, prompts_per_step=6, seed=0)
    request = DrawRequest()
    request.restrict("curriculum", lambda p: p.skill in ("sub", "add_carry"))
    request.weight("focus", lambda p: 10.0 if p.skill == "sub" else 1.0)
    first, again = sampler.draw(4, 2, request), sampler.draw(4, 2, request)
    assert first == again and first != sampler.draw(5, 2, request)
    drawn = [p for rank in first for p in rank]
    assert len(drawn) == 12 and len({p.problem_id for p in drawn}) == 12  # disjoint across ranks
    assert {p.skill for p in drawn} <= {"sub", "add_carry"}
    subs = sum(p.skill == "sub" for r in range(30) for rank in sampler.draw(r, 2, request) for p in rank)
    assert subs > 0.75 * 30 * 12  # weight 10 against 1 on similarly sized skills
    request.restrict("nothing", lambda p: False)
    with pytest.raises(RuntimeError, match="no training problem is allowed by"):
        sampler.draw(0, 1, request)


def test_reference_and_teacher_sources(tiny_student: str, tiny_teacher: str) -> None:
    module = DistillModule(student=tiny_student, teacher=tiny_teacher, loss=LossConfig(forward_kl=1.0))
    data = make_data(data_source="reference")
    make_trainer(1).fit(module, datamodule=data)
    batch = data.rollout(0)
    problems = data.pipeline.sampler.draw(0)[0]
    assert batch.source == "reference"
    assert batch.sampling_logprobs is None
    assert batch.completions == [p.reference for p in problems]
    assert batch.rewards.tolist() == [1.0] * len(problems)
    data.pipeline.data_source = "teacher"
    data.pipeline.teacher_samples_per_prompt = 2
    batch = data.rollout(0)
    assert batch.input_ids.shape[0] == 2 * len(problems)
    data.pipeline.teacher_correct_only = True
    with pytest.raises(RuntimeError, match="no responses"):
        data.rollout(0)  # an untrained teacher solves nothing


def test_lmbda_mixes_on_and_off_policy_batches(tiny_student: str) -> None:
    module = DistillModule(student=tiny_student, teacher=None)
    data = make_data(lmbda=0.5, off_policy_source="reference")
    make_trainer(1).fit(module, datamodule=data)
    sources = [data.pipeline.source_for(i) for i in range(200)]
    assert set(sources) == {"student", "reference"}
    assert 70 < sources.count("student") < 130


def test_bad_arguments_name_the_key() -> None:
    with pytest.raises(ValueError, match="data.prompts_per_step"):
        make_data(prompts_per_step=0)
    with pytest.raises(ValueError, match="data.lmbda"):
        make_data(lmbda=1.5)
    with pytest.raises(ValueError, match="sampling.top_p"):
        SamplingConfig(top_p=0)
    with pytest.raises(ValueError, match="data.source.verifier"):
        ArithmeticCurriculum(verifier="regex")  # type: ignore[arg-type]


class EditingHook(Callback, RolloutHook):
    """Touches every phase; declares the extras field it adds."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def rollout_controls(self) -> set[str]:
        return {"extras.extra"}

    def on_draw(self, ctx: Any, draw: DrawRequest) -> None:
        self.calls.append("draw")
        draw.restrict("editing", lambda p: p.skill == "sub")

    def on_plan(self, ctx: Any, plan: Any) -> None:
        self.calls.append("plan")
        plan.prompts.append(PromptSpec(plan.prompts[0].problem, kind="ncq", student_prompt="1+1=?\n"))

    def on_observe(self, ctx: Any, plan: Any, summaries: list) -> None:
        self.calls.append("observe")
        assert all(s.rank == 0 for s in summaries) and len(summaries) == 4

    def on_weight(self, ctx: Any, plan: Any, groups: list, summaries: list) -> list[list[float]]:
        self.calls.append("weight")
        return [[3.0] * len(g.weights) if k == 0 else [1.0] * len(g.weights) for k, g in enumerate(groups)]

    def on_build(self, ctx: Any, plan: Any, batch: Any) -> None:
        self.calls.append("build")
        batch.extras["extra"] = torch.ones(batch.size)


def test_hooks_run_in_phases_and_edit_what_they_declare(tiny_student: str) -> None:
    hook = EditingHook()
    module = DistillModule(student=tiny_student, teacher=None)
    data = make_data()
    make_trainer(1, [hook]).fit(module, datamodule=data)
    assert hook.calls == ["draw", "plan", "observe", "weight", "build"]
    batch = data.rollout(1)
    assert set(batch.skills) == {"sub"}
    assert batch.kinds[-2:] == ["ncq", "ncq"]
    assert batch.weights[:2].tolist() == [3.0, 3.0] and batch.weights[2:].tolist() == [1.0] * 6
    assert torch.equal(batch.extras["extra"], torch.ones(8))


class SourceSetter(Callback, RolloutHook):
    def __init__(self, declare: bool) -> None:
        self.declare = declare

    def rollout_controls(self) -> set[str]:
        return {"data_source"} if self.declare else set()

    def on_plan(self, ctx: Any, plan: Any) -> None:
        plan.data_source = "reference"


def test_two_hooks_setting_one_control_is_an_error_at_setup(tiny_student: str) -> None:
    module = DistillModule(student=tiny_student, teacher=None)
    with pytest.raises(ValueError, match="SourceSetter and SourceSetter both set the rollout's data_source"):
        make_trainer(1, [SourceSetter(True), SourceSetter(True)]).fit(module, datamodule=make_data())


def test_an_undeclared_change_is_an_error(tiny_student: str) -> None:
    module = DistillModule(student=tiny_student, teacher=None)
    with pytest.raises(RuntimeError, match="SourceSetter changed plan data_source without declaring it"):
        make_trainer(1, [SourceSetter(False)]).fit(module, datamodule=make_data())


class RaisingVerifier(Verifier):
    """Raises on every response that does not start with a digit."""

    def extract(self, response: str) -> str | None:
        if not response[:1].isdigit():
            raise ValueError("unparseable")
        return response

    def score(self, response: str, answer: str) -> float:
        return float(self.extract(response) is not None)


def test_a_verifier_exception_scores_zero_and_is_counted(tiny_student: str) -> None:
    module = DistillModule(student=tiny_student, teacher=None)
    data = make_data(verifier=RaisingVerifier())
    make_trainer(2).fit(module, datamodule=data)
    batch = data.rollout(2)
    raising = [not c[:1].isdigit() for c in batch.completions]
    assert any(raising)
    assert batch.rewards.tolist() == [0.0 if r else 1.0 for r in raising]
    assert data.counters.verifier_errors >= sum(raising)
    assert batch.metrics["rollout/verifier_errors_total"] == data.counters.verifier_errors


def test_context_evaluates_any_subset(tiny_student: str) -> None:
    module = DistillModule(student=tiny_student, teacher=None)
    data = make_data(eval_samples=2)
    make_trainer(1).fit(module, datamodule=data)
    subs = [p for p in data.source.problems("validation") if p.skill == "sub"]
    result = data.context.evaluate(module.student, subs)
    assert result.problem_ids == [p.problem_id for p in subs] and set(result.skills) == {"sub"}
    assert result.greedy_correct.shape == (len(subs),) and result.sample_pass_rate is not None


def test_lightning_moves_every_tensor_of_a_batch(tiny_student: str) -> None:
    """The transfer Lightning applies to a batch (``DistillModule.transfer_batch_to_device``)
    reaches the typed batch's tensors, extras and histograms included; lists and scalars are
    shared, and a tensor two fields share stays one."""
    module = DistillModule(student=tiny_student, teacher=None)
    data = make_data()
    make_trainer(1).fit(module, datamodule=data)
    batch = data.rollout(0)
    batch.extras["per_row"] = torch.ones(batch.size)
    batch.histograms["h"] = torch.zeros(3)
    assert batch.teacher_input_ids is batch.input_ids
    moved = module.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert isinstance(moved, type(batch)) and moved.problem_ids is batch.problem_ids
    tensors = [moved.input_ids, moved.sampling_logprobs, moved.weights, moved.extras["per_row"], moved.histograms["h"]]
    assert all(t.device.type == "meta" for t in tensors)
    assert moved.teacher_input_ids is moved.input_ids  # the teacher still reads the student's prompt
    assert batch.input_ids.device.type == "cpu"  # the original is untouched


def test_evaluation_shared_over_ranks_returns_every_problem_in_order(make_context: Any) -> None:
    from tests.conftest import ScriptedEngine

    engine = ScriptedEngine({f"{i}+1=?\n": [f"\\boxed{{{i + 1 if i % 3 else 0}}}"] for i in range(200)})
    single = make_context(engine)
    problems = single.source.problems("train")[:7]
    rank0, rank1 = make_context(engine, rank=0, world_size=2), make_context(engine, rank=1, world_size=2)
    # Rank 1's share, as the gather would bring it to rank 0.
    rank0.gather = lambda local: [local, rank1.evaluate_batch(rank1.student, problems[1::2])]  # type: ignore[method-assign]
    shared, alone = rank0.evaluate(rank0.student, problems), single.evaluate(single.student, problems)
    assert shared.problem_ids == alone.problem_ids == [p.problem_id for p in problems]
    assert torch.equal(shared.greedy_correct, alone.greedy_correct)
    assert shared.greedy_correct.tolist() == [float(i % 3 != 0) for i in range(7)]

