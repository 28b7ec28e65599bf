"""IOA: the CurriculumScheduler's probes, Identifier re-runs and frontier draws, the TeacherAdapter's
choice, and both in real Trainer runs (resume, stacking with ZPPO's replay, TensorBoard)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_zpd.callbacks.adapter import TeacherAdapter
from lit_zpd.callbacks.beta_kernel import BetaKernelWeighting
from lit_zpd.callbacks.curriculum import CurriculumScheduler, cell_of
from lit_zpd.callbacks.kl_schedule import KLSchedule, ScheduleStage
from lit_zpd.callbacks.replay_graduation import ReplayGraduationCallback
from lit_zpd.callbacks.rollout_logging import RolloutLogger
from lit_zpd.cli import main
from lit_zpd.module import DistillModule, LossConfig
from lit_zpd.rollout.context import RolloutContext
from lit_zpd.rollout.engine import Completion, RolloutEngine, SamplingConfig
from lit_zpd.rollout.plan import DrawRequest, PromptSpec, RolloutGroup, RolloutHook, RolloutPlan
from lit_zpd.rollout.sampler import ProblemSampler
from lit_zpd.tasks.arithmetic import ArithmeticCurriculum
from lit_zpd.tasks.problem import SPLITS, Problem
from tests.conftest import ByteTokenizer
from tests.probes import StopAtStep
from tests.test_exposure import _plain
from tests.test_rollout import make_data

ROOT = Path(__file__).resolve().parents[1]
ALL_CELLS = {
    ("add_1digit", 1), ("add_1digit", 2), ("add_carry", 1), ("add_carry", 2), ("add_carry", 3),
    ("sub", 1), ("sub", 2), ("sub", 3), ("mul_1digit", 1), ("mul_1digit", 2), ("multi_step", 1), ("multi_step", 2),
}


def source() -> ArithmeticCurriculum:
    """Every (skill, level) cell has problems in the test split (the probes' default)."""
    return ArithmeticCurriculum(problems_per_level=200, max_eval_per_skill=None)


class CellEngine(RolloutEngine):
    """Answers a problem correctly when its (skill, level) cell is in ``solved`` (which a test may
    change between probes), ``\\boxed{x}`` otherwise."""

    def __init__(self, problems: list[Problem], solved: set[tuple[str, int]]) -> None:
        self.by_prompt = {p.prompt: p for p in problems}
        self.solved = solved
        self.generated = 0

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingConfig) -> list[list[Completion]]:
        out = []
        for ids in prompts:
            problem = self.by_prompt[bytes(ids).decode()]
            text = f"\\boxed{{{problem.answer}}}" if cell_of(problem) in self.solved else "\\boxed{x}"
            out.append([Completion(list(text.encode()), [0.0] * len(text)) for _ in range(n)])
            self.generated += n * len(text)
        return out


def cell_context(solved: set[tuple[str, int]]) -> tuple[RolloutContext, CellEngine, CellEngine]:
    """A context over :func:`source` whose teacher solves every cell and whose student solves ``solved``."""
    src = source()
    problems = [p for split in SPLITS for p in src.problems(split)]
    student, teacher = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    engines = {id(student): CellEngine(problems, solved), id(teacher): CellEngine(problems, set(ALL_CELLS))}
    ctx = RolloutContext(
        student=student, teacher=teacher, tokenizer=ByteTokenizer(), source=src,
        engine_factory=lambda model: engines[id(model)], seed=0, loss=LossConfig(forward_kl=1.0),
    )
    return ctx, engines[id(student)], engines[id(teacher)]


def draw_cells(scheduler: CurriculumScheduler, ctx: RolloutContext, rollouts: int = 1, size: int = 64) -> list[tuple[str, int]]:
    sampler = ProblemSampler(ctx.source.problems("train"), size, seed=0)
    cells = []
    for index in range(rollouts):
        request = DrawRequest()
        scheduler.on_draw(ctx, request)
        cells += [cell_of(p) for p in sampler.draw(index, 1, request)[0]]
    return cells


# --------------------------------------------------------------------------------- the scheduler


def test_identifier_gating_ceiling_and_review_share_shape_the_draw() -> None:
    solved = {c for c in ALL_CELLS if c[0] in ("add_1digit", "add_carry")} | {("sub", 1)}
    ctx, student, teacher = cell_context(solved)
    scheduler = CurriculumScheduler(active_share=1.0, review_share=0.2, probe_size=4)
    cells = draw_cells(scheduler, ctx, rollouts=20)
    org = scheduler.organizer
    assert org is not None
    last = scheduler.history[-1]
    # Relative gaps: sub 2/3, mul_1digit 1, multi_step 1. Severity (alpha 0.5, connectivity
    # sub 1/4, mul 1/4, multi 0): mul 0.625 > multi 0.5 > sub 0.458.
    assert last["deficient"] == ["mul_1digit", "multi_step", "sub"]
    assert last["student"]["sub"] == pytest.approx(1 / 3) and last["teacher"]["sub"] == 1.0
    # multi_step waits for mul_1digit and sub; sub's level 1 is mastered, so its ceiling rose one level.
    assert org.active() == ["mul_1digit", "sub"]
    assert org.frontier() == {("mul_1digit", 1), ("sub", 1), ("sub", 2)}
    assert last["events"]["raised"] == ["sub"]
    review = {c for c in ALL_CELLS if c[0] in ("add_1digit", "add_carry")}
    assert set(cells) <= org.frontier() | review
    share = sum(c in review for c in cells) / len(cells)
    assert 0.15 < share < 0.25  # review_share 0.2 of 1280 draws
    # Only the student's probes count in the rollout budget (the teacher was probed once).
    assert ctx.take_pending().student_tokens == student.generated > 0
    assert teacher.generated > 0


def test_reprobe_masters_unlocks_and_remediates_with_a_rerun_identifier() -> None:
    solved = {c for c in ALL_CELLS if c[0] in ("add_1digit", "add_carry")}
    ctx, _, teacher = cell_context(solved)
    scheduler = CurriculumScheduler(active_share=1.0, review_share=0.0, probe_size=4, reprobe_every_n_steps=5)
    draw_cells(scheduler, ctx)
    org = scheduler.organizer
    assert org is not None and org.active() == ["mul_1digit", "sub"]
    teacher_probe = teacher.generated
    ctx.policy_version = 4
    draw_cells(scheduler, ctx)
    assert len(scheduler.history) == 1  # not due before 5 steps
    solved |= {("mul_1digit", 1), ("mul_1digit", 2), ("sub", 1), ("sub", 2), ("sub", 3)}
    ctx.policy_version = 5
    cells = draw_cells(scheduler, ctx)
    assert scheduler.history[-1]["events"]["mastered"] == ["mul_1digit", "sub"]
    assert set(cells) == {("multi_step", 1)}  # unlocked, easiest level first
    # The student forgets add_carry (never deficient) and sub: the Identifier's re-run adds
    # add_carry, and sub returns to the frontier (remediation).
    solved -= {("add_carry", 1), ("add_carry", 2), ("add_carry", 3), ("sub", 3)}
    ctx.policy_version = 10
    draw_cells(scheduler, ctx)
    events = scheduler.history[-1]["events"]
    assert events["identified"] == ["add_carry"] and events["remediated"] == ["sub"]
    assert "add_carry" in org.active() and ("sub", 3) in org.frontier()
    assert ("multi_step", 1) not in org.frontier()  # its prerequisite sub is no longer mastered
    assert teacher.generated == teacher_probe and len(scheduler.history) == 3  # the frozen teacher is probed once


def test_without_gating_every_deficient_skill_is_taught_at_every_level() -> None:
    ctx, _, _ = cell_context({c for c in ALL_CELLS if c[0] == "add_1digit"})
    scheduler = CurriculumScheduler(gating=False, review_share=0.0, probe_size=4)
    cells = set(draw_cells(scheduler, ctx, rollouts=10))
    assert cells == {c for c in ALL_CELLS if c[0] != "add_1digit"}


def test_nothing_deficient_leaves_the_draw_unrestricted() -> None:
    ctx, _, _ = cell_context(set(ALL_CELLS))
    scheduler = CurriculumScheduler(probe_size=2)
    request = DrawRequest()
    scheduler.on_draw(ctx, request)
    assert not request.restrictions and not request.weightings


def test_probe_split_must_cover_every_training_cell_and_settings_are_named() -> None:
    ctx, _, _ = cell_context(set())
    ctx.source = ArithmeticCurriculum(problems_per_level=60, max_eval_per_skill=2)
    with pytest.raises(ValueError, match="the test split has no problem of skill .* to probe"):
        CurriculumScheduler().on_draw(ctx, DrawRequest())
    for kwargs, key in (
        ({"gap_threshold": 1.5}, "gap_threshold"), ({"review_share": 1.0}, "review_share"),
        ({"probe_size": 0}, "probe_size"), ({"probe_split": "dev"}, "probe_split"),
        ({"reprobe_every_n_steps": 0}, "reprobe_every_n_steps"), ({"mastery_ratio": 0.0}, "mastery_ratio"),
        ({"max_difficulty_step": 2.0}, "max_difficulty_step"),
    ):
        with pytest.raises(ValueError, match=key):
            CurriculumScheduler(**kwargs)


def test_a_graph_skill_without_training_problems_is_named() -> None:
    class WithDivision(ArithmeticCurriculum):
        def skill_graph(self) -> dict[str, list[str]]:
            return super().skill_graph() | {"division": ["mul_1digit"]}

    ctx, _, _ = cell_context(set())
    ctx.source = WithDivision(problems_per_level=200, max_eval_per_skill=None)
    with pytest.raises(ValueError, match="skill 'division' of data.source's skill graph has no training problem"):
        CurriculumScheduler().on_draw(ctx, DrawRequest())


def test_a_resume_with_another_probe_set_probes_the_teacher_again() -> None:
    ctx, _, teacher = cell_context({c for c in ALL_CELLS if c[0] == "add_1digit"})
    scheduler = CurriculumScheduler(probe_size=4)
    draw_cells(scheduler, ctx)
    state = scheduler.state_dict()
    same, other = CurriculumScheduler(probe_size=4), CurriculumScheduler(probe_size=3)
    same.load_state_dict(state)
    other.load_state_dict(state)
    assert same.teacher_accuracy == scheduler.teacher_accuracy and other.teacher_accuracy is None
    before = teacher.generated
    ctx.policy_version = 25
    draw_cells(other, ctx)
    assert teacher.generated > before and len(other.history) == 2


def test_the_live_student_is_no_yardstick(tiny_student: str) -> None:
    module = DistillModule(student=tiny_student, teacher="self_live", loss=LossConfig(sft=1.0))
    trainer = Trainer(max_steps=1, logger=False, enable_checkpointing=False, callbacks=[CurriculumScheduler()])
    with pytest.raises(ValueError, match="self_live"):
        trainer.fit(module, datamodule=make_data(source=source(), data_source="reference"))


def test_replay_keeps_to_the_draw_restrictions(make_context: Callable[..., RolloutContext]) -> None:
    ctx = make_context()
    replay = ReplayGraduationCallback(replay_ratio=1.0)
    for i in range(10):
        replay.observe(f"p{i}", 0.0, 0)
    request = DrawRequest()
    request.restrict("curriculum", lambda p: p.problem_id in {"p1", "p3", "p20"})
    plan = RolloutPlan(0, 0, "student", [PromptSpec(ctx.problem("p20"))], drawn=8, draw=request)
    replay.on_plan(ctx, plan)
    assert sorted(s.problem.problem_id for s in plan.prompts if s.replayed) == ["p1", "p3"]
    assert len(replay.buffer) == 10  # the others wait in the buffer


# --------------------------------------------------------------------------------- the adapter


@pytest.fixture(scope="module")
def student_context(tiny_student: str) -> RolloutContext:
    model = AutoModelForCausalLM.from_pretrained(tiny_student)
    tokenizer = AutoTokenizer.from_pretrained(tiny_student)
    return RolloutContext(
        student=model, teacher=model, tokenizer=tokenizer, source=ArithmeticCurriculum(problems_per_level=5),
        engine_factory=lambda m: None, seed=0, loss=LossConfig(forward_kl=1.0),  # type: ignore[arg-type,return-value]
    )


def teacher_group(ctx: RolloutContext, problem: Problem, texts: list[str]) -> RolloutGroup:
    spec = PromptSpec(problem)
    eos = ctx.tokenizer.eos_token_id
    return RolloutGroup(spec, [ctx.tokenize(t) + [eos] for t in texts], texts, [ctx.reward(t, problem.answer) for t in texts])


def mean_nll(model: Any, ctx: RolloutContext, prompt: str, response_ids: list[int]) -> float:
    prompt_ids = ctx.tokenize(prompt)
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1, : len(ctx.tokenizer)].float(), -1)
    picked = logprobs[torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1), torch.tensor(response_ids)]
    return -picked.mean().item()


def test_adapter_keeps_the_correct_sample_with_the_lowest_student_nll(student_context: RolloutContext) -> None:
    ctx = student_context
    problem = next(p for p in ctx.source.problems("train") if p.skill == "add_carry")
    right = [problem.reference, f"{problem.reference}\n", f"so\n\\boxed{{{problem.answer}}}"]
    group = teacher_group(ctx, problem, ["\\boxed{0}", *right])
    unsolved = teacher_group(ctx, problem, ["\\boxed{0}", "\\boxed{1}"])
    plan = RolloutPlan(0, 0, "teacher", [group.spec, unsolved.spec])
    nll = [mean_nll(ctx.student, ctx, problem.prompt, ids) for ids in group.token_ids[1:]]
    total = [n * len(ids) for n, ids in zip(nll, group.token_ids[1:])]
    adapted = TeacherAdapter().on_adapt(ctx, plan, [group, unsolved])
    assert adapted is not None and len(adapted) == 1  # the problem without a correct sample is dropped
    assert adapted[0].texts == [right[min(range(3), key=nll.__getitem__)]] and adapted[0].rewards == [1.0]
    assert plan.metrics["curriculum/adapter_dropped"] == 1.0
    assert plan.metrics["curriculum/adapter_student_nll"] == pytest.approx(min(nll), rel=1e-4)
    # The choice follows the NLL whatever the order of the samples.
    backwards = teacher_group(ctx, problem, [*reversed(right), "\\boxed{0}"])
    again = TeacherAdapter().on_adapt(ctx, plan, [backwards])
    assert again is not None and again[0].texts == adapted[0].texts
    summed = TeacherAdapter(criterion="student_total_nll").on_adapt(ctx, plan, [group])
    assert summed is not None and summed[0].texts == [right[min(range(3), key=total.__getitem__)]]
    shortest = TeacherAdapter(criterion="shortest").on_adapt(ctx, plan, [group])
    assert shortest is not None and shortest[0].texts == [min(right, key=len)]
    first = TeacherAdapter(criterion="first").on_adapt(ctx, plan, [group])
    assert first is not None and first[0].texts == [right[0]]
    assert TeacherAdapter().on_adapt(ctx, RolloutPlan(0, 0, "student", []), [group]) is None


def test_rewrite_puts_correct_samples_in_the_column_template_and_merges_them(student_context: RolloutContext) -> None:
    ctx = student_context
    problem = next(p for p in ctx.source.problems("train") if p.skill == "sub")
    group = teacher_group(ctx, problem, [f"{problem.answer}?\n\\boxed{{{problem.answer}}}", f"\\boxed{{{problem.answer}}}", "\\boxed{x}"])
    plan = RolloutPlan(0, 0, "teacher", [group.spec])
    adapted = TeacherAdapter(rewrite=True).on_adapt(ctx, plan, [group])
    assert adapted is not None and adapted[0].texts == [problem.reference]
    assert adapted[0].token_ids == [ctx.tokenize(problem.reference) + [ctx.tokenizer.eos_token_id]]
    assert plan.metrics["curriculum/adapter_candidates"] == 1.0  # two correct samples, one rewrite
    assert plan.metrics["curriculum/adapter_rewritten"] == 1.0
    with pytest.raises(ValueError, match="criterion"):
        TeacherAdapter(criterion="longest")  # type: ignore[arg-type]


def test_only_off_policy_batches_are_adapted_and_only_by_a_declared_hook(tiny_student: str, tiny_teacher: str) -> None:
    class Record(Callback, RolloutHook):
        def __init__(self, declare: bool) -> None:
            self.declare, self.sources = declare, []

        def rollout_controls(self) -> set[str]:
            return {"responses"} if self.declare else set()

        def on_adapt(self, ctx: RolloutContext, plan: RolloutPlan, groups: list[RolloutGroup]) -> list[RolloutGroup]:
            self.sources.append(plan.data_source)
            return groups[:1]

    declared = Record(declare=True)
    module = DistillModule(student=tiny_student, teacher=tiny_teacher, loss=LossConfig(forward_kl=1.0))
    seen: list[int] = []

    class Rows(Callback):
        def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            seen.append(len(set(batch.problem_ids)) if batch.source == "teacher" else -1)

    trainer = Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, callbacks=[declared, Rows()])
    trainer.fit(module, datamodule=make_data(lmbda=0.5, off_policy_source="teacher"))
    assert -1 in seen and declared.sources == ["teacher"] * sum(n != -1 for n in seen)
    assert all(n in (-1, 1) for n in seen)  # the hook's choice is what trained
    undeclared = Trainer(max_steps=1, logger=False, enable_checkpointing=False, callbacks=[Record(declare=False)])
    with pytest.raises(RuntimeError, match="changed the batch.s responses without declaring"):
        undeclared.fit(DistillModule(student=tiny_student, teacher=tiny_teacher, loss=LossConfig(forward_kl=1.0)),
                       datamodule=make_data(data_source="teacher"))


# --------------------------------------------------------------------------------- real runs


class Seen(Callback):
    """Per batch: its problems' cells and replayed flags, and the cells the curriculum allowed."""

    def __init__(self, scheduler: CurriculumScheduler) -> None:
        self.scheduler = scheduler
        self.rows: list[tuple[list[tuple[str, int]], set[tuple[str, int]] | None, int]] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        org = self.scheduler.organizer
        assert org is not None
        review = org.review() if self.scheduler.review_share > 0 else set()
        allowed = (org.frontier() | review) if org.frontier() else None
        problems = [trainer.datamodule.context.problem(pid) for pid in batch.problem_ids]
        replayed = int(batch.metrics.get("replay/step_replayed", 0)) if batch.first_minibatch else 0
        self.rows.append(([cell_of(p) for p in problems], allowed, replayed))


EMBEDDED: dict[str, Any] = {  # the embedded models have real deficiencies: sub, mul_1digit and multi_step
    "source": ArithmeticCurriculum(problems_per_level=60, max_eval_per_skill=None),
    "sampling": SamplingConfig(temperature=1.0, max_new_tokens=48),
    "eval_sampling": SamplingConfig(max_new_tokens=48),
    "prompts_per_step": 4,
}


def curriculum_run(tmp_path: Path, steps: int, stop_at: int | None = None, ckpt: str | None = None, logger: bool = False) -> tuple[CurriculumScheduler, DistillModule, Seen]:
    scheduler = CurriculumScheduler(probe_size=4, reprobe_every_n_steps=2, active_share=0.5)
    seen = Seen(scheduler)
    callbacks: list[Callback] = [
        scheduler, TeacherAdapter(), seen, RolloutLogger(),
        ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}"),
        *([StopAtStep(stop_at)] if stop_at else []),
    ]
    module = DistillModule(loss=LossConfig(forward_kl=1.0), optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    trainer = Trainer(
        max_steps=steps, logger=TensorBoardLogger(tmp_path, name="tb") if logger else False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
        callbacks=callbacks,
    )
    data = make_data(**EMBEDDED, data_source="teacher", teacher_samples_per_prompt=3)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    return scheduler, module, seen


def test_curriculum_draws_the_frontier_and_resumes_exactly(tmp_path: Path) -> None:
    full, full_module, full_seen = curriculum_run(tmp_path / "full", 6, logger=True)
    assert len(full.history) == 3 and full.history[0]["deficient"]
    for cells, allowed, _ in full_seen.rows:
        assert allowed is None or set(cells) <= allowed
    assert any(allowed is not None for _, allowed, _ in full_seen.rows)
    curriculum_run(tmp_path / "first", 6, stop_at=3)
    resumed, resumed_module, resumed_seen = curriculum_run(tmp_path / "resumed", 6, ckpt=str(tmp_path / "first" / "step=3.ckpt"))
    assert _plain(resumed.state_dict()) == _plain(full.state_dict())
    assert [cells for cells, _, _ in resumed_seen.rows] == [cells for cells, _, _ in full_seen.rows[3:]]
    for a, b in zip(full_module.student.parameters(), resumed_module.student.parameters()):
        assert torch.equal(a, b)
    # TensorBoard: the heat map after each probe, the per-skill mastery scalars.
    events = EventAccumulator(str(next((tmp_path / "full").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert len(events.Images("curriculum/mastery_map")) == 3
    assert {"curriculum/mastery/sub", "curriculum/frontier_cells", "curriculum/adapter_candidates"} <= set(events.Tags()["scalars"])


def test_stacked_with_zppo_every_row_replayed_or_new_is_a_frontier_problem() -> None:
    scheduler = CurriculumScheduler(probe_size=4, reprobe_every_n_steps=3, review_share=0.0)
    replay = ReplayGraduationCallback(graduation_threshold=1.0, replay_ratio=1.0, augment_ratio=0.5, ncq_max_candidates=1)
    seen = Seen(scheduler)
    module = DistillModule(loss=LossConfig(policy=1.0))
    data = make_data(**EMBEDDED, samples_per_prompt=4)
    Trainer(max_steps=8, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0, callbacks=[scheduler, replay, seen]).fit(module, datamodule=data)
    restricted = [(cells, allowed, replayed) for cells, allowed, replayed in seen.rows if allowed is not None]
    assert restricted and sum(replayed for *_, replayed in restricted) > 0
    for cells, allowed, _ in restricted:
        assert set(cells) <= allowed  # plain, replayed, BCQ and NCQ rows alike
    assert replay.admissions > 0


def test_stacked_with_paced_weighting_and_a_teacher_first_schedule() -> None:
    """The frontier holds on the schedule's teacher stage and its student stage; PACED still
    weights the rows; the Adapter acts on the teacher stage only."""
    scheduler = CurriculumScheduler(probe_size=4, reprobe_every_n_steps=2)
    seen = Seen(scheduler)
    kept: list[Any] = []

    class Keep(Callback):
        def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            kept.append((batch.source, batch.weights.clone(), dict(batch.metrics)))

    schedule = KLSchedule(
        before=ScheduleStage(loss={"forward_kl": 1.0}, data_source="teacher"),
        after=ScheduleStage(loss={"reverse_kl": 1.0}, data_source="student"), switch_at_step=3,
    )
    module = DistillModule(loss=LossConfig(forward_kl=1.0))
    data = make_data(**EMBEDDED, samples_per_prompt=4, teacher_samples_per_prompt=2)
    callbacks = [scheduler, BetaKernelWeighting(), schedule, TeacherAdapter(), seen, Keep()]
    Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0, callbacks=callbacks).fit(module, datamodule=data)
    assert [source for source, _, _ in kept] == ["teacher"] * 3 + ["student"] * 3
    for cells, allowed, _ in seen.rows:
        assert allowed is not None and set(cells) <= allowed
    assert any((weights != 1).any() for _, weights, _ in kept)
    assert all(("curriculum/adapter_candidates" in metrics) == (source == "teacher") for source, _, metrics in kept)


@pytest.mark.parametrize("name", ["ioa", "ioa+ioa_ablations/rewrite", "ioa_zppo", "ioa_gkd"])
def test_ioa_configs_run_a_few_steps(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(
        [
            "fit", *(f"--config={ROOT / 'configs' / f'{part}.yaml'}" for part in name.split("+")),
            "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--data.source=lit_zpd.tasks.ArithmeticCurriculum", "--data.source.max_eval_per_skill=12",
            "--data.prompts_per_step=4", "--data.eval_samples=0",
        ]
    )
    out = capsys.readouterr().out
    assert "curriculum after 1 probes" in out and "student (end)" in out
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert events.Images("curriculum/mastery_map")
