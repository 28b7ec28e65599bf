"""IOA's Adapter: the teacher's material fitted to what the student can absorb (seed 001).

The paper's Adapter is a prompted teacher rewrite (explicit steps, a standard solution template,
smaller first instances, simpler words). Here, on teacher batches (``data.data_source: teacher``,
with ``data.teacher_samples_per_prompt`` samples per problem), in the pipeline's adapt phase
(:mod:`lit_zpd.rollout.plan`):

1. the teacher's correct samples of each problem are kept (a problem without one is dropped
   from the batch, as ``data.teacher_correct_only`` would);
2. with ``rewrite``, each is rewritten into the source's standard solution template
   (:meth:`~lit_zpd.tasks.problem.ProblemSource.rewrite_solution`; the embedded curriculum writes
   every column step out), and identical rewrites are merged;
3. one sample per problem is kept, the one the ``criterion`` finds most learnable:
   ``student_nll``, the lowest mean per-token negative log-likelihood under the current student
   (what it can almost say already); ``student_total_nll``, the lowest summed NLL (favours short
   solutions); ``shortest``, the fewest tokens; ``first``, the first correct sample.

The chosen sample is the off-policy target of the batch's loss (forward KL to the teacher's
distribution on those tokens, or SFT). Student and reference batches pass through unchanged.

Logs per rollout ``curriculum/adapter_candidates`` (distinct candidates per problem, mean: the
correct samples, or their distinct rewrites),
``curriculum/adapter_dropped`` (problems without a correct sample), ``curriculum/adapter_rewritten``
(share of kept samples the rewrite changed) and ``curriculum/adapter_student_nll`` (mean per-token
NLL of the kept samples, when the criterion measured it), this rank's figures (rank 0's are
written). It keeps no state: every choice is a function of the batch and the current student.
"""

from __future__ import annotations

from typing import Literal, get_args

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_zpd.rollout.context import RolloutContext
from lit_zpd.rollout.plan import RolloutGroup, RolloutHook, RolloutPlan

AdapterCriterion = Literal["student_nll", "student_total_nll", "shortest", "first"]


class TeacherAdapter(Callback, RolloutHook):
    """Keep, per problem, the correct teacher sample the student finds most learnable (see the
    module doc).

    Args:
        criterion: ``student_nll``, ``student_total_nll``, ``shortest`` or ``first``.
        rewrite: Rewrite each correct sample into the source's standard solution template first.

    Example, in YAML under ``trainer.callbacks`` (with ``data.teacher_samples_per_prompt: 4``)::

        - class_path: lit_zpd.callbacks.adapter.TeacherAdapter
          init_args: {criterion: student_nll}
    """

    def __init__(self, criterion: AdapterCriterion = "student_nll", rewrite: bool = False) -> None:
        if criterion not in get_args(AdapterCriterion):
            raise ValueError(f"TeacherAdapter.criterion must be one of {', '.join(get_args(AdapterCriterion))}, got {criterion!r}")
        self.criterion = criterion
        self.rewrite = rewrite

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(criterion=self.criterion, rewrite=self.rewrite)

    @override
    def rollout_controls(self) -> set[str]:
        return {"responses"}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        data = trainer.datamodule
        if getattr(pl_module, "teacher", None) is None:
            raise ValueError("TeacherAdapter chooses among teacher samples: set model.teacher")
        settings = getattr(data, "rollout_settings", {})
        teacher_batches = settings.get("off_policy_source" if settings.get("lmbda") is not None else "data_source") == "teacher"
        scheduled = any("data_source" in cb.rollout_controls() for cb in trainer.callbacks if isinstance(cb, RolloutHook))
        if settings and not teacher_batches and not scheduled:
            raise ValueError(
                "TeacherAdapter adapts teacher samples, and this run has none: set data.data_source: teacher "
                "(or data.lmbda with data.off_policy_source: teacher)"
            )
        if self.rewrite:
            source = data.source
            probe = source.problems("train")[0]
            try:
                source.rewrite_solution(probe, "")
            except NotImplementedError as error:
                raise ValueError(f"TeacherAdapter.rewrite: {error}; set rewrite: false") from None

    @override
    def on_adapt(self, ctx: RolloutContext, plan: RolloutPlan, groups: list[RolloutGroup]) -> list[RolloutGroup] | None:
        if plan.data_source != "teacher":
            return None
        candidates = [self._candidates(ctx, group) for group in groups]
        nll = self._student_nll(ctx, groups, candidates)
        adapted, rewritten, kept_nll = [], 0, []
        for group, options, scores in zip(groups, candidates, nll):
            if not options:
                continue
            best = min(range(len(options)), key=lambda i: self._key(options[i], scores[i] if scores else None, i))
            token_ids, text, changed = options[best]
            rewritten += changed
            if scores:
                kept_nll.append(scores[best][0])
            adapted.append(RolloutGroup(spec=group.spec, token_ids=[token_ids], texts=[text], rewards=[1.0]))
        plan.metrics |= {
            "curriculum/adapter_candidates": sum(len(c) for c in candidates) / max(len(groups), 1),
            "curriculum/adapter_dropped": float(len(groups) - len(adapted)),
            "curriculum/adapter_rewritten": rewritten / max(len(adapted), 1),
        }
        if kept_nll:
            plan.metrics["curriculum/adapter_student_nll"] = sum(kept_nll) / len(kept_nll)
        return adapted

    def _candidates(self, ctx: RolloutContext, group: RolloutGroup) -> list[tuple[list[int], str, bool]]:
        """(token ids, text, rewritten) of each correct sample, rewritten and merged when asked."""
        out: list[tuple[list[int], str, bool]] = []
        for token_ids, text, reward in zip(group.token_ids, group.texts, group.rewards):
            if reward <= 0:
                continue
            changed = False
            if self.rewrite:
                new = ctx.source.rewrite_solution(group.spec.problem, text)
                if new is None:
                    continue
                changed = new != text
                if changed:
                    token_ids, text = ctx.tokenize(new) + [ctx.tokenizer.eos_token_id], new
                if any(text == seen for _, seen, _ in out):
                    continue
            out.append((token_ids, text, changed))
        return out

    def _student_nll(
        self, ctx: RolloutContext, groups: list[RolloutGroup], candidates: list[list[tuple[list[int], str, bool]]]
    ) -> list[list[tuple[float, float]]]:
        """(mean, summed) per-token NLL of every candidate under the student when the criterion
        needs it (empty lists otherwise)."""
        if self.criterion not in ("student_nll", "student_total_nll"):
            return [[] for _ in groups]
        rows = [(g, c) for g, options in zip(groups, candidates) for c in options]
        logprobs = ctx.sequence_logprobs(
            ctx.student, [ctx.encode_prompt(g.spec.student_prompt) for g, _ in rows], [c[0] for _, c in rows]
        )
        scores = iter([(-float(lp.mean()), -float(lp.sum())) for lp in logprobs])
        return [[next(scores) for _ in options] for options in candidates]

    def _key(self, option: tuple[list[int], str, bool], score: tuple[float, float] | None, index: int) -> tuple[float, int]:
        if self.criterion == "shortest":
            return (float(len(option[0])), index)
        if self.criterion == "first" or score is None:
            return (0.0, index)
        return (score[0] if self.criterion == "student_nll" else score[1], index)
