"""RolloutDataModule: the Lightning adapter over the rollout pipeline.

It owns four things: the training loader, which yields only batch indices; the transfer hook,
which turns index ``t`` into a :class:`~lit_zpd.rollout.batch.RolloutBatch` right before its
training step; the settings of the pipeline (YAML key ``data``); and the run's rollout state in
checkpoints (batches consumed, counters, the pass-rate tracker, unserved minibatches). Planning,
sampling, scoring and batching are :class:`~lit_zpd.rollout.pipeline.RolloutPipeline`'s; what
hooks may use is :class:`~lit_zpd.rollout.context.RolloutContext`'s.

Zero policy lag: Lightning calls ``on_before_batch_transfer`` for a batch right before its training
step and after the previous optimizer step. It prefetches one item from the loader, so sampling in
the loader itself would use weights one step old; here the prefetched item is a plain integer.

PPO minibatches: with ``ppo_minibatches = m`` one rollout serves ``m`` consecutive batch indices
(rollout ``r = t // m``, minibatch ``k = t % m``), each its own optimizer step. The rollout is
sampled at ``k = 0`` (zero lag), its rows shuffled (seeded by ``r``) and split into ``m`` parts; a
group may span parts, which is harmless because advantages are computed on the whole rollout
first. Minibatch ``k`` keeps the rollout's ``policy_version`` (lag ``k`` by design); the loss's
importance ratio against the sampling log-probs corrects it. The unserved parts of every rank are
in :meth:`RolloutDataModule.state_dict`, so a checkpoint taken mid-rollout resumes exactly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import fields
from typing import Any, Literal

from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.types import EVAL_DATALOADERS, TRAIN_DATALOADERS
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from lit_zpd.assets import resolve
from lit_zpd.loss_config import LossConfig
from lit_zpd.rollout.batch import EvalBatch, RolloutBatch
from lit_zpd.rollout.context import RolloutContext, RolloutCounters
from lit_zpd.rollout.engine import RolloutEngine, SamplingConfig
from lit_zpd.rollout.hf_engine import HFEngine
from lit_zpd.rollout.pass_rates import PassRateSettings, PassRateTracker
from lit_zpd.rollout.pipeline import AdvantageEstimator, RolloutPipeline
from lit_zpd.rollout.plan import DataSource, RolloutHook
from lit_zpd.rollout.prompts import PromptFormat
from lit_zpd.rollout.sampler import ProblemSampler
from lit_zpd.rollout.vllm_engine import VLLMEngine, VLLMSettings
from lit_zpd.tasks.arithmetic import ArithmeticCurriculum
from lit_zpd.tasks.problem import Problem, ProblemSource, Split


class _BatchIndices(IterableDataset):
    """Endless ``start, start + 1, ...``; ``start`` is read when iteration begins (after a resume)."""

    def __init__(self, datamodule: RolloutDataModule) -> None:
        self.datamodule = datamodule

    def __iter__(self) -> Iterator[int]:
        index = self.datamodule.batches_consumed
        while True:
            yield index
            index += 1


class _EvalShard(IterableDataset):
    """This rank's share of the validation problems (every ``world``-th from ``rank``), in batches:
    each problem is evaluated once over all ranks, where a padded distributed sampler would repeat
    some."""

    def __init__(self, problems: list[Problem], rank: int, world: int, batch_size: int) -> None:
        self.problems = problems[rank::world]
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[Problem]]:
        for i in range(0, len(self.problems), self.batch_size):
            yield self.problems[i : i + self.batch_size]


class RolloutDataModule(LightningDataModule):
    """Samples, scores and batches rollouts for :class:`~lit_zpd.module.DistillModule`.

    Args:
        source: Where problems come from, with the verifier that scores responses; the embedded
            arithmetic curriculum by default.
        prompts_per_step: New problems per rollout (per rank).
        samples_per_prompt: ``G``, completions sampled per prompt (student rollouts).
        data_source: Who writes the responses: ``student`` (on-policy rollouts), ``teacher``
            (teacher samples, off-policy) or ``reference`` (reference solutions).
        lmbda: GKD's mixing: when set, each rollout is on-policy (student rollouts) with this
            probability and otherwise uses ``off_policy_source``; ``data_source`` is then ignored.
        off_policy_source: The off-policy responses used when ``lmbda`` mixes.
        teacher_samples_per_prompt: Completions the teacher samples per prompt.
        teacher_correct_only: Keep only the teacher's correct samples (a prompt with none is
            dropped from the batch).
        sampling: Sampling of student rollouts.
        teacher_sampling: Sampling of teacher responses; ``sampling`` if ``None``.
        engine: Rollout engine of the student: ``hf`` (Hugging Face ``generate`` on the live
            student) or ``vllm`` (colocated vLLM, synced after each optimizer step; needs
            ``sampling.top_p`` 1). A separate teacher always uses ``hf`` (a ``self_live``
            teacher is the student and shares its engine).
        vllm: Options of the ``vllm`` engine; defaults if ``None``.
        generation_batch_size: Sequences per engine call.
        advantage_scale_by_std: GRPO advantages divided by the group's std (Dr. GRPO if False).
        advantage_estimator: ``grpo``: group-normalised advantages; ``reinforce_pp``: REINFORCE++
            with a group baseline, ``r - mean_group`` normalised over the rollout's groups that
            have a reward spread, on every rank together (ZPPO). Computed over the whole rollout,
            before minibatching.
        ppo_minibatches: Optimizer steps per rollout: one rollout is sampled for every
            ``ppo_minibatches`` consecutive batch indices and served as that many shuffled row
            minibatches. ``trainer.max_steps`` counts these minibatch steps.
        pass_rate: How the student's pass rate is measured on off-policy batches when a callback
            reads it there (PACED's weighting, ZPPO's replay behind a teacher-first schedule).
        eval_samples: ``k`` for the mean accuracy over ``k`` samples at validation.
        eval_sampling: Sampling for that mean; greedy accuracy is always measured too.
        eval_batch_size: Problems per validation batch.
        prompt: How prompt text becomes tokens: the chat template (applied when the tokenizer has
            one), a system message, the prompt length limit and what happens past it, and extra
            stop tokens (:class:`~lit_zpd.rollout.prompts.PromptFormat`).
        seed: Seeds problem order, on/off-policy choice and sampling noise; ``None`` takes the
            run's ``seed_everything`` (0 when there is none).

    Example::

        data = RolloutDataModule(prompts_per_step=8, samples_per_prompt=4, data_source="student")
    """

    def __init__(
        self,
        source: ProblemSource | None = None,
        prompts_per_step: int = 16,
        samples_per_prompt: int = 8,
        data_source: DataSource = "student",
        lmbda: float | None = None,
        off_policy_source: DataSource = "teacher",
        teacher_samples_per_prompt: int = 1,
        teacher_correct_only: bool = False,
        sampling: SamplingConfig = SamplingConfig(),
        teacher_sampling: SamplingConfig | None = None,
        engine: Literal["hf", "vllm"] = "hf",
        vllm: VLLMSettings | None = None,
        generation_batch_size: int = 256,
        advantage_scale_by_std: bool = True,
        advantage_estimator: AdvantageEstimator = "grpo",
        ppo_minibatches: int = 1,
        pass_rate: PassRateSettings = PassRateSettings(),
        eval_samples: int = 8,
        eval_sampling: SamplingConfig = SamplingConfig(temperature=1.0),
        eval_batch_size: int = 64,
        prompt: PromptFormat = PromptFormat(),
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.check_settings({k: v for k, v in locals().items() if k not in ("self", "__class__")})
        self.source = source if source is not None else ArithmeticCurriculum()
        self.prompts_per_step = prompts_per_step
        # The pipeline's own settings, handed to it when it is built.
        self.rollout_settings: dict[str, Any] = dict(
            samples_per_prompt=samples_per_prompt, data_source=data_source, lmbda=lmbda,
            off_policy_source=off_policy_source, teacher_samples_per_prompt=teacher_samples_per_prompt,
            teacher_correct_only=teacher_correct_only, advantage_estimator=advantage_estimator,
            advantage_scale_by_std=advantage_scale_by_std, pass_rate=pass_rate,
        )
        self.sampling = sampling
        self.teacher_sampling = teacher_sampling or sampling
        self.engine_name = engine
        self.vllm = vllm
        self.generation_batch_size = generation_batch_size
        self.ppo_minibatches = ppo_minibatches
        self.eval_samples = eval_samples
        self.eval_sampling = eval_sampling
        self.eval_batch_size = eval_batch_size
        self.prompt = prompt
        self.seed = seed if seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        self.batches_consumed = 0
        self.counters = RolloutCounters()
        self.pass_rates = PassRateTracker()
        self._context: RolloutContext | None = None
        self._pipeline: RolloutPipeline | None = None
        # (rollout index, its minibatches) while minibatches of that rollout remain to be served.
        self._minibatches: tuple[int, list[RolloutBatch]] | None = None
        self._restored_parts: tuple[int, list[list[dict[str, Any]]]] | None = None

    @staticmethod
    def check_settings(settings: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` naming the ``data.*`` key of the first out-of-range setting.

        Takes the constructor's arguments by name (missing ones are not checked); the CLI calls it
        on the parsed ``data`` section before any model loads."""
        value = settings.get
        for name in (
            "prompts_per_step", "samples_per_prompt", "teacher_samples_per_prompt",
            "generation_batch_size", "eval_batch_size", "ppo_minibatches",
        ):
            if value(name) is not None and value(name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value(name)}")
        if value("eval_samples") is not None and value("eval_samples") < 0:
            raise ValueError(f"data.eval_samples must be >= 0, got {value('eval_samples')}")
        if value("lmbda") is not None and not 0.0 <= value("lmbda") <= 1.0:
            raise ValueError(f"data.lmbda must be in [0, 1], got {value('lmbda')}")
        if value("data_source", "student") not in ("student", "teacher", "reference"):
            raise ValueError(f"data.data_source must be 'student', 'teacher' or 'reference', got {value('data_source')!r}")
        if value("off_policy_source") == "student":
            raise ValueError("data.off_policy_source must be 'teacher' or 'reference'")
        if value("advantage_estimator", "grpo") not in ("grpo", "reinforce_pp"):
            raise ValueError(
                f"data.advantage_estimator must be 'grpo' or 'reinforce_pp', got {value('advantage_estimator')!r}"
            )
        if value("engine", "hf") not in ("hf", "vllm"):
            raise ValueError(f"data.engine must be 'hf' or 'vllm', got {value('engine')!r}")
        top_p = getattr(value("sampling"), "top_p", 1.0)
        if value("engine") == "vllm" and top_p is not None and top_p < 1:
            raise ValueError("data.sampling.top_p must be 1 with data.engine: vllm (its log-probs would be renormalised)")

    # ----------------------------------------------------------------------------- the pipeline

    @property
    def context(self) -> RolloutContext:
        """The hooks' context, built on first use from the trainer's module, rank and world size."""
        if self.trainer is None:
            raise RuntimeError("RolloutDataModule needs a trainer with a DistillModule attached")
        module = self.trainer.lightning_module
        if self._context is None or self._context.student is not module.student:
            self._context = RolloutContext(
                student=module.student,
                teacher=module.teacher,
                tokenizer=module.tokenizer,
                source=self.source,
                engine_factory=self._make_engine,
                seed=self.seed,
                loss=module.loss_config,
                sampling=self.sampling,
                teacher_sampling=self.teacher_sampling,
                eval_samples=self.eval_samples,
                eval_sampling=self.eval_sampling,
                eval_batch_size=self.eval_batch_size,
                prompt=self.prompt,
                rank=self.trainer.global_rank,
                world_size=self.trainer.world_size,
                pass_rates=self.pass_rates,
                counters=self.counters,
                profile=self.trainer.profiler.profile,
            )
        self._context.policy_version = self.trainer.global_step
        return self._context

    @property
    def pipeline(self) -> RolloutPipeline:
        if self._pipeline is None:
            self._pipeline = RolloutPipeline(
                self.context,
                ProblemSampler(self.context.problems("train"), self.prompts_per_step, self.seed),
                self.hooks(),
                **self.rollout_settings,
            )
        return self._pipeline

    def hooks(self) -> list[RolloutHook]:
        """The trainer's callbacks that take part in rollouts."""
        return [cb for cb in self.trainer.callbacks if isinstance(cb, RolloutHook)] if self.trainer else []

    def _make_engine(self, model: nn.Module) -> RolloutEngine:
        module = self.trainer.lightning_module
        tok, stops = module.tokenizer, self.context.prompts.stop_ids
        if self.engine_name == "vllm" and model is module.student:
            return VLLMEngine(resolve(module.hparams.student), stops, len(tok), self.vllm)
        return HFEngine(model, tok.pad_token_id, stops, len(tok), self.generation_batch_size)

    # ----------------------------------------------------------------------------- Lightning

    @override
    def setup(self, stage: str) -> None:
        self._pipeline = None  # the trainer's callbacks may have changed
        if not self.context.problems("train"):
            raise ValueError("data.source has no training problems (or none whose prompt fits data.prompt.max_tokens)")
        pipeline = self.pipeline  # built now, so a conflict between hooks is reported at setup
        controlled = set().union(*(h.rollout_controls() for h in pipeline.hooks))
        if stage == "fit" and not controlled & {"loss", "data_source"}:
            pipeline.check_setup()

    @property
    def skills(self) -> list[str]:
        return self.source.skills()

    @override
    def train_dataloader(self) -> TRAIN_DATALOADERS:
        return DataLoader(_BatchIndices(self), batch_size=None)

    @override
    def val_dataloader(self) -> EVAL_DATALOADERS:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        problems = self.context.problems("validation") if self.trainer is not None else self.source.problems("validation")
        return DataLoader(_EvalShard(problems, rank, world, self.eval_batch_size), batch_size=None)

    @override
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training:
            return self.train_batch(int(batch))
        return self.context.evaluate_batch(self.context.student, batch)

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "batches_consumed": self.batches_consumed,
            **{name: getattr(self.counters, name) for name in RolloutCounters.names()},
            "pass_rates": self.pass_rates.state_dict(),
        }
        if self.ppo_minibatches > 1:
            # Checkpoints are written by rank 0 but taken on every rank: gather each rank's parts.
            local = None if self._minibatches is None else (self._minibatches[0], [_plain(b) for b in self._minibatches[1]])
            ranks = self.context.gather(local) if self.trainer is not None else [local]
            if any(r is not None for r in ranks):
                state["minibatches"] = {"rollout_index": next(r for r in ranks if r)[0], "parts_by_rank": [r[1] for r in ranks]}
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches_consumed = int(state_dict.get("batches_consumed", 0))
        for name in RolloutCounters.names():
            setattr(self.counters, name, int(state_dict.get(name, 0)))
        self.pass_rates.load_state_dict(state_dict.get("pass_rates", {}))
        cached = state_dict.get("minibatches")
        self._minibatches = None
        self._restored_parts = (int(cached["rollout_index"]), cached["parts_by_rank"]) if cached else None

    # ----------------------------------------------------------------------------- one step

    def train_batch(self, index: int) -> RolloutBatch:
        """Training batch ``index``: minibatch ``index % ppo_minibatches`` of rollout ``index // ppo_minibatches``."""
        rollout_index, part = divmod(index, self.ppo_minibatches)
        ctx = self.context  # brings the policy version up to date
        if self._restored_parts is not None:
            restored, by_rank = self._restored_parts
            self._restored_parts = None
            if restored == rollout_index:
                if len(by_rank) != ctx.world_size:
                    raise RuntimeError(
                        f"the checkpoint holds minibatches of {len(by_rank)} ranks, this run has {ctx.world_size}; "
                        "resume mid-rollout with the same number of processes"
                    )
                self._minibatches = (rollout_index, [_batch(p) for p in by_rank[ctx.rank]])
        if self._minibatches is None or self._minibatches[0] != rollout_index:
            if part:
                raise RuntimeError(
                    f"batch {index} is minibatch {part} of rollout {rollout_index}, which is not cached; "
                    "resume from a checkpoint that holds the data module's state"
                )
            rollout = self.pipeline.rollout(rollout_index)
            if min(self.pipeline.rows_per_rank) < self.ppo_minibatches:  # the same decision on every rank
                raise RuntimeError(
                    f"rollout {rollout_index} has {min(self.pipeline.rows_per_rank)} rows on a rank, fewer than "
                    f"data.ppo_minibatches={self.ppo_minibatches}"
                )
            self._minibatches = (rollout_index, rollout.split(self.ppo_minibatches, (self.seed, "minibatch", rollout_index)))
        batch = self._minibatches[1][part]
        batch.batch_index = index
        if batch.last_minibatch:
            self._minibatches = None
        self.batches_consumed = index + 1
        return batch

    def rollout(self, index: int) -> RolloutBatch:
        """Rollout ``index`` as one batch (all its rows), through the pipeline."""
        self.context  # noqa: B018 - brings the policy version up to date
        return self.pipeline.rollout(index)

    # ----------------------------------------------------------------------------- evaluation

    def evaluate(self, model: Any, split: Split = "validation") -> EvalBatch:
        """Greedy and sampled accuracy of ``model`` on a whole split (shared out over the ranks)."""
        return self.context.evaluate(model, self.context.problems(split))


def _plain(batch: RolloutBatch) -> dict[str, Any]:
    """A batch as plain data for a checkpoint (``torch.load(weights_only=True)`` reads it)."""
    out = {f.name: getattr(batch, f.name) for f in fields(batch)}
    out["loss"] = None if batch.loss is None else {f.name: getattr(batch.loss, f.name) for f in fields(batch.loss)}
    return out


def _batch(plain: dict[str, Any]) -> RolloutBatch:
    loss = plain.get("loss")
    return RolloutBatch(**(plain | {"loss": LossConfig(**loss) if loss is not None else None}))
