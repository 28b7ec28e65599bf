"""RolloutDataModule: problems in, scored rollouts out, sampled from the current weights.

The training loader yields only batch indices. The rollout for index ``t`` runs in
``on_before_batch_transfer``, which Lightning calls for a batch right before its training step and
after the previous optimizer step. Lightning prefetches one item from the loader, so sampling in
the loader itself would use weights one step old; here the prefetched item is a plain integer and
the policy lag is zero. Every random choice of batch ``t`` (which problems, on- or off-policy,
sampling noise) is seeded from ``(seed, t)``, so a resumed run rolls out exactly what an
uninterrupted one would.

PPO minibatches: with ``ppo_minibatches = m`` one rollout serves ``m`` consecutive batch indices
(rollout ``r = t // m``, minibatch ``k = t % m``), each its own optimizer step. The rollout is
sampled at ``k = 0`` (zero lag), its rows are shuffled (seeded by ``r``) and split into ``m``
parts; a group may span parts, which is harmless because advantages are computed on the whole
rollout first. Minibatch ``k`` keeps the rollout's ``policy_version`` (lag ``k`` by design); the
loss's importance ratio against the sampling log-probs corrects it. The unserved parts are in
:meth:`RolloutDataModule.state_dict`, so a checkpoint taken mid-rollout resumes exactly.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from contextlib import contextmanager
from collections.abc import Iterator
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.types import EVAL_DATALOADERS, TRAIN_DATALOADERS
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from lit_zpd.assets import resolve
from lit_zpd.losses import group_advantages, reinforce_pp_advantages
from lit_zpd.rollout.batch import build_batch
from lit_zpd.rollout.engine import RolloutEngine, SamplingConfig
from lit_zpd.rollout.hf_engine import HFEngine
from lit_zpd.rollout.plan import DataSource, PromptSpec, RolloutGroup, RolloutHook, RolloutPlan
from lit_zpd.rollout.vllm_engine import VLLMEngine, VLLMSettings
from lit_zpd.tasks.arithmetic import ArithmeticCurriculum
from lit_zpd.tasks.problem import Problem, ProblemSource, Split
from lit_zpd.tasks.verifier import score_response


class _BatchIndices(IterableDataset):
    """Endless ``start, start + 1, ...``; ``start`` is read when iteration begins (after a resume)."""

    def __init__(self, datamodule: RolloutDataModule) -> None:
        self.datamodule = datamodule

    def __iter__(self) -> Iterator[int]:
        index = self.datamodule.batches_consumed
        while True:
            yield index
            index += 1


class RolloutDataModule(LightningDataModule):
    """Samples, scores and batches rollouts for :class:`~lit_zpd.module.DistillModule`.

    Args:
        source: Where problems come from; the embedded arithmetic curriculum by default.
        prompts_per_step: New problems per training batch.
        samples_per_prompt: ``G``, completions sampled per prompt (student rollouts).
        data_source: Who writes the responses: ``student`` (on-policy rollouts), ``teacher``
            (teacher samples, off-policy) or ``reference`` (reference solutions).
        lmbda: GKD's mixing: when set, each batch is on-policy (student rollouts) with this
            probability and otherwise uses ``off_policy_source``; ``data_source`` is then ignored.
        off_policy_source: The off-policy responses used when ``lmbda`` mixes.
        teacher_samples_per_prompt: Completions the teacher samples per prompt.
        teacher_correct_only: Keep only the teacher's correct samples (a prompt with none is
            dropped from the batch).
        sampling: Sampling of student rollouts.
        teacher_sampling: Sampling of teacher responses; ``sampling`` if ``None``.
        engine: Rollout engine of the student: ``hf`` (Hugging Face ``generate`` on the live
            student) or ``vllm`` (colocated vLLM, synced after each optimizer step; needs
            ``sampling.top_p`` 1). The teacher always uses ``hf``.
        vllm: Options of the ``vllm`` engine; defaults if ``None``.
        generation_batch_size: Sequences per engine call.
        advantage_scale_by_std: GRPO advantages divided by the group's std (Dr. GRPO if False).
        advantage_estimator: ``grpo``: group-normalised advantages; ``reinforce_pp``: REINFORCE++
            with a group baseline, ``r - mean_group`` normalised over the batch's groups that have
            a reward spread (ZPPO). Computed over the whole rollout, before minibatching.
        ppo_minibatches: Optimizer steps per rollout: one rollout is sampled for every
            ``ppo_minibatches`` consecutive batch indices and served as that many shuffled row
            minibatches. ``trainer.max_steps`` counts these minibatch steps.
        eval_samples: ``k`` for the mean accuracy over ``k`` samples at validation.
        eval_sampling: Sampling for that mean; greedy accuracy is always measured too.
        eval_batch_size: Problems per validation batch.
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
        advantage_estimator: Literal["grpo", "reinforce_pp"] = "grpo",
        ppo_minibatches: int = 1,
        eval_samples: int = 8,
        eval_sampling: SamplingConfig = SamplingConfig(temperature=1.0),
        eval_batch_size: int = 64,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("prompts_per_step", prompts_per_step),
            ("samples_per_prompt", samples_per_prompt),
            ("teacher_samples_per_prompt", teacher_samples_per_prompt),
            ("generation_batch_size", generation_batch_size),
            ("eval_batch_size", eval_batch_size),
            ("ppo_minibatches", ppo_minibatches),
        ):
            if value < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value}")
        if eval_samples < 0:
            raise ValueError(f"data.eval_samples must be >= 0, got {eval_samples}")
        if lmbda is not None and not 0.0 <= lmbda <= 1.0:
            raise ValueError(f"data.lmbda must be in [0, 1], got {lmbda}")
        if data_source not in ("student", "teacher", "reference"):
            raise ValueError(f"data.data_source must be 'student', 'teacher' or 'reference', got {data_source!r}")
        if off_policy_source == "student":
            raise ValueError("data.off_policy_source must be 'teacher' or 'reference'")
        if advantage_estimator not in ("grpo", "reinforce_pp"):
            raise ValueError(f"data.advantage_estimator must be 'grpo' or 'reinforce_pp', got {advantage_estimator!r}")
        if engine not in ("hf", "vllm"):
            raise ValueError(f"data.engine must be 'hf' or 'vllm', got {engine!r}")
        if engine == "vllm" and sampling.top_p < 1:
            raise ValueError("data.sampling.top_p must be 1 with data.engine: vllm (its log-probs would be renormalised)")
        self.source = source if source is not None else ArithmeticCurriculum()
        self.prompts_per_step = prompts_per_step
        self.samples_per_prompt = samples_per_prompt
        self.data_source = data_source
        self.lmbda = lmbda
        self.off_policy_source = off_policy_source
        self.teacher_samples_per_prompt = teacher_samples_per_prompt
        self.teacher_correct_only = teacher_correct_only
        self.sampling = sampling
        self.teacher_sampling = teacher_sampling or sampling
        self.engine_name = engine
        self.vllm = vllm
        self.generation_batch_size = generation_batch_size
        self.advantage_scale_by_std = advantage_scale_by_std
        self.advantage_estimator = advantage_estimator
        self.ppo_minibatches = ppo_minibatches
        self.eval_samples = eval_samples
        self.eval_sampling = eval_sampling
        self.eval_batch_size = eval_batch_size
        self.seed = seed if seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        self.batches_consumed = 0
        self.student_tokens = 0  # completion tokens of training rollouts sampled from the student: the RL budget
        self._train: list[Problem] = []
        self._engines: dict[int, RolloutEngine] = {}
        self._synced_versions: dict[int, int] = {}  # model id -> global_step of its engine's last sync
        self._sync_seconds = 0.0
        # (rollout index, its minibatches) while minibatches of that rollout remain to be served.
        self._minibatches: tuple[int, list[dict[str, Any]]] | None = None

    # ----------------------------------------------------------------------------- Lightning

    @override
    def setup(self, stage: str) -> None:
        self._train = self.source.problems("train")
        self._orders: dict[int, list[int]] = {}
        if not self._train:
            raise ValueError("data.source has no training problems")

    @override
    def train_dataloader(self) -> TRAIN_DATALOADERS:
        return DataLoader(_BatchIndices(self), batch_size=None)

    @override
    def val_dataloader(self) -> EVAL_DATALOADERS:
        return DataLoader(self.source.problems("validation"), batch_size=self.eval_batch_size, collate_fn=list)

    @override
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training:
            return self.train_batch(int(batch))
        return self.evaluate_batch(self._module.student, batch)

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"batches_consumed": self.batches_consumed, "student_tokens": self.student_tokens}
        if self._minibatches is not None:
            state["minibatches"] = {"rollout_index": self._minibatches[0], "parts": self._minibatches[1]}
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches_consumed = int(state_dict.get("batches_consumed", 0))
        self.student_tokens = int(state_dict.get("student_tokens", 0))
        cached = state_dict.get("minibatches")
        self._minibatches = (int(cached["rollout_index"]), list(cached["parts"])) if cached else None

    # ----------------------------------------------------------------------------- properties

    @property
    def skills(self) -> list[str]:
        return self.source.skills()

    @property
    def needs_teacher(self) -> bool:
        sources = {self.data_source} if self.lmbda is None else {"student", self.off_policy_source}
        return "teacher" in sources

    @property
    def _module(self) -> Any:
        if self.trainer is None:
            raise RuntimeError("RolloutDataModule needs a trainer with a DistillModule attached")
        return self.trainer.lightning_module

    def _hooks(self) -> list[RolloutHook]:
        return [cb for cb in self.trainer.callbacks if isinstance(cb, RolloutHook)] if self.trainer else []

    def engine_for(self, model: torch.nn.Module) -> RolloutEngine:
        """The engine sampling ``model`` (one per model, built on first use), synced to ``model``'s
        weights when the policy version (``global_step``) moved since its last sync."""
        module = self._module
        if id(model) not in self._engines:
            tok = module.tokenizer
            if self.engine_name == "vllm" and model is module.student:
                engine: RolloutEngine = VLLMEngine(resolve(module.hparams.student), tok.eos_token_id, len(tok), self.vllm)
            else:
                engine = HFEngine(model, tok.pad_token_id, tok.eos_token_id, len(tok), self.generation_batch_size)
            self._engines[id(model)] = engine
        if self._synced_versions.get(id(model)) != self.trainer.global_step:
            start = time.perf_counter()
            self._engines[id(model)].sync_weights(model)
            self._sync_seconds += time.perf_counter() - start
            self._synced_versions[id(model)] = self.trainer.global_step
        return self._engines[id(model)]

    def score(self, spec: PromptSpec, token_ids: list[list[int]]) -> RolloutGroup:
        """Decode and verify completions of ``spec`` as training rollouts are scored (for hooks
        that sample on their own, e.g. the student's pass rate on off-policy batches)."""
        return self._group(spec, token_ids, None)

    # ----------------------------------------------------------------------------- one step

    def problems_for(self, index: int) -> list[Problem]:
        """The new problems of batch ``index``: epochs of seeded permutations of the train split."""
        n = len(self._train)
        out = []
        for position in range(index * self.prompts_per_step, (index + 1) * self.prompts_per_step):
            epoch, offset = divmod(position, n)
            out.append(self._train[self._epoch_order(epoch)[offset]])
        return out

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self._train)))
            random.Random(f"{self.seed}:epoch:{epoch}").shuffle(order)
            self._orders = {epoch: order}  # batches walk forward: one epoch's order at a time
        return self._orders[epoch]

    def source_for(self, index: int) -> DataSource:
        if self.lmbda is None:
            return self.data_source
        on_policy = random.Random(f"{self.seed}:lmbda:{index}").random() < self.lmbda
        return "student" if on_policy else self.off_policy_source

    def train_batch(self, index: int) -> dict[str, Any]:
        """Training batch ``index``: minibatch ``index % ppo_minibatches`` of rollout ``index // ppo_minibatches``.

        Besides the rollout's fields it carries ``batch_index``, ``rollout_index``,
        ``minibatch_index`` and ``last_minibatch`` (True on the rollout's last minibatch: callbacks
        that act between rollouts, not inside one, check it).
        """
        rollout_index, part = divmod(index, self.ppo_minibatches)
        if self._minibatches is None or self._minibatches[0] != rollout_index:
            if part:
                raise RuntimeError(
                    f"batch {index} is minibatch {part} of rollout {rollout_index}, which is not cached; "
                    "resume from a checkpoint that holds the data module's state"
                )
            self._minibatches = (rollout_index, self._split(self.rollout(rollout_index), rollout_index))
        batch = self._minibatches[1][part] | {
            "batch_index": index, "rollout_index": rollout_index, "minibatch_index": part,
            "last_minibatch": part == self.ppo_minibatches - 1,
        }
        if batch["last_minibatch"]:
            self._minibatches = None
        self.batches_consumed = index + 1
        return batch

    def _split(self, batch: dict[str, Any], rollout_index: int) -> list[dict[str, Any]]:
        """``ppo_minibatches`` row subsets of a rollout batch, shuffled with a seed of the rollout.

        Fields whose first dimension is the row count are split; the others are shared.
        """
        if self.ppo_minibatches == 1:
            return [batch]
        rows = batch["input_ids"].shape[0]
        if rows < self.ppo_minibatches:
            raise RuntimeError(
                f"rollout {rollout_index} has {rows} rows, fewer than data.ppo_minibatches={self.ppo_minibatches}"
            )
        order = list(range(rows))
        random.Random(f"{self.seed}:minibatch:{rollout_index}").shuffle(order)
        parts = [sorted(order[k :: self.ppo_minibatches]) for k in range(self.ppo_minibatches)]
        return [{key: _take_rows(value, part, rows) for key, value in batch.items()} for part in parts]

    def rollout(self, index: int) -> dict[str, Any]:
        """Plan, sample, score and batch training batch ``index`` (design steps 1-5)."""
        module = self._module
        plan = RolloutPlan(
            index=index,
            policy_version=self.trainer.global_step,
            source=self.source_for(index),
            prompts=[PromptSpec(p) for p in self.problems_for(index)],
        )
        for hook in self._hooks():
            hook.on_rollout_plan(self.trainer, plan)
        self._sync_seconds = 0.0
        with seeded(self.seed, "rollout", index):
            groups = self._respond(plan, module)
            # Hooks sample inside the seeded block (e.g. a teacher), so their draws repeat on resume.
            extra = [spec for hook in self._hooks() for spec in hook.on_rollout_augment(self.trainer, plan, groups)]
            if extra:
                plan.prompts.extend(extra)
                groups += self._respond(plan, module, extra)
        for hook in self._hooks():
            hook.on_rollout_scored(self.trainer, plan, groups)
        if not groups:
            raise RuntimeError(f"batch {index} has no responses (teacher_correct_only dropped every prompt?)")
        advantages = self._advantages(groups) if plan.source == "student" else None
        if plan.source == "student":
            self.student_tokens += sum(len(ids) for g in groups for ids in g.token_ids)
        batch = build_batch(groups, module.tokenize, module.tokenizer.pad_token_id, advantages)
        batch.update(
            policy_version=plan.policy_version,
            batch_index=index,
            source=plan.source,
            # Engines report greedy log-probs at temperature 1.
            sampling_temperature=(self.sampling.temperature or 1.0) if plan.source == "student" else 1.0,
            sync_seconds=self._sync_seconds,
            student_tokens_total=self.student_tokens,
        )
        for hook in self._hooks():
            hook.on_batch_built(self.trainer, plan, batch)
        return batch

    def _respond(self, plan: RolloutPlan, module: Any, specs: list[PromptSpec] | None = None) -> list[RolloutGroup]:
        specs = plan.prompts if specs is None else specs
        if plan.source == "reference":
            for spec in specs:
                if spec.problem.reference is None:
                    raise ValueError(f"problem {spec.problem.problem_id!r} has no reference solution")
            return [
                self._group(spec, [module.tokenize(spec.problem.reference) + [module.tokenizer.eos_token_id]], None)
                for spec in specs
            ]
        if plan.source == "student":
            model, n, sampling = module.student, self.samples_per_prompt, self.sampling
        else:
            model, n, sampling = module.teacher, self.teacher_samples_per_prompt, self.teacher_sampling
        prompts = [module.tokenize(spec.teacher_prompt if plan.source == "teacher" and spec.teacher_prompt
                                   else spec.student_prompt) for spec in specs]
        completions = self.engine_for(model).generate(prompts, n, sampling)
        groups = []
        for spec, samples in zip(specs, completions):
            group = self._group(
                spec,
                [c.token_ids for c in samples],
                [c.logprobs for c in samples] if plan.source == "student" else None,
            )
            if plan.source == "teacher" and self.teacher_correct_only:
                group = _keep_correct(group)
            if group.token_ids:
                groups.append(group)
        return groups

    def _group(self, spec: PromptSpec, token_ids: list[list[int]], logprobs: list[list[float]] | None) -> RolloutGroup:
        texts = [self._module.tokenizer.decode(ids, skip_special_tokens=True) for ids in token_ids]
        rewards = [score_response(t, spec.problem.answer) for t in texts]
        return RolloutGroup(spec=spec, token_ids=token_ids, texts=texts, rewards=rewards, sampling_logprobs=logprobs)

    def _advantages(self, groups: list[RolloutGroup]) -> list[float]:
        rewards = torch.tensor([r for g in groups for r in g.rewards])
        ids = torch.tensor([k for k, g in enumerate(groups) for _ in g.rewards])
        if self.advantage_estimator == "reinforce_pp":
            return reinforce_pp_advantages(rewards, ids).tolist()
        return group_advantages(rewards, ids, scale_by_std=self.advantage_scale_by_std).tolist()

    # ----------------------------------------------------------------------------- evaluation

    def evaluate_batch(self, model: torch.nn.Module, problems: list[Problem]) -> dict[str, Any]:
        """Greedy correctness and mean correctness over ``eval_samples`` samples, per problem."""
        module = self._module
        engine = self.engine_for(model)
        prompts = [module.tokenize(p.prompt) for p in problems]
        greedy = engine.generate(prompts, 1, SamplingConfig(0.0, 1.0, self.eval_sampling.max_new_tokens))
        tok = module.tokenizer
        greedy_correct = [
            score_response(tok.decode(g[0].token_ids, skip_special_tokens=True), p.answer)
            for p, g in zip(problems, greedy)
        ]
        out: dict[str, Any] = {
            "problem_ids": [p.problem_id for p in problems],
            "skills": [p.skill for p in problems],
            "greedy_correct": torch.tensor(greedy_correct),
            "greedy_texts": [tok.decode(g[0].token_ids, skip_special_tokens=True) for g in greedy],
            "prompts": [p.prompt for p in problems],
        }
        if self.eval_samples:
            with seeded(self.seed, "eval"):
                sampled = engine.generate(prompts, self.eval_samples, self.eval_sampling)
            out["sample_pass_rate"] = torch.tensor(
                [
                    sum(score_response(tok.decode(c.token_ids, skip_special_tokens=True), p.answer) for c in group)
                    / len(group)
                    for p, group in zip(problems, sampled)
                ]
            )
        return out

    def evaluate(self, model: torch.nn.Module, split: Split = "validation") -> list[dict[str, Any]]:
        """:meth:`evaluate_batch` over a whole split, in ``eval_batch_size`` chunks."""
        problems = self.source.problems(split)
        return [
            self.evaluate_batch(model, problems[i : i + self.eval_batch_size])
            for i in range(0, len(problems), self.eval_batch_size)
        ]


def _take_rows(value: Any, rows: list[int], n_rows: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n_rows:
        return value[rows]
    if isinstance(value, list) and len(value) == n_rows:
        return [value[i] for i in rows]
    return value


def _keep_correct(group: RolloutGroup) -> RolloutGroup:
    keep = [i for i, r in enumerate(group.rewards) if r > 0]
    return RolloutGroup(
        spec=group.spec,
        token_ids=[group.token_ids[i] for i in keep],
        texts=[group.texts[i] for i in keep],
        rewards=[group.rewards[i] for i in keep],
    )


@contextmanager
def seeded(*keys: object) -> Iterator[None]:
    """Seed torch's global generator from ``keys`` for a block and restore it after.

    The seed is a hash of the keys, so streams with different keys (``(seed, "rollout", t)``,
    ``(seed, "eval")``, a callback's own) never coincide.
    """
    digest = hashlib.sha256(repr(keys).encode()).digest()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int.from_bytes(digest[:8], "big"))
        yield
