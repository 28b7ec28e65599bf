"""RolloutContext: everything a rollout hook may use, and nothing of the trainer.

A hook (:class:`~lit_zpd.rollout.plan.RolloutHook`) receives this object in every phase. It holds
the models (the student, the teacher of whatever kind), the tokenizer, the engines that sample
them, the problem source's verifier, seeded random streams, the student rollout token count, the
rank, the world size and a gather across ranks, evaluation of any problem subset, and the shared
per-problem pass-rate tracker. It imports nothing from Lightning, so a hook or a diagnostic can be
driven without a running fit (build one with the data module's
:meth:`~lit_zpd.rollout.datamodule.RolloutDataModule.context`, or directly).

Counters (student rollout tokens, verifier errors) are counted per rank and summed over the ranks
once per rollout, when the pipeline gathers the scored groups; the totals are then the same on
every rank.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from lit_zpd.forward import response_logprobs
from lit_zpd.loss_config import LossConfig
from lit_zpd.rollout.batch import EvalBatch, pack_rows
from lit_zpd.rollout.engine import Completion, RolloutEngine, SamplingConfig
from lit_zpd.rollout.pass_rates import PassRateTracker
from lit_zpd.rollout.plan import PromptSpec, RolloutGroup
from lit_zpd.rollout.prompts import PromptEncoder, PromptFormat, context_length
from lit_zpd.tasks.problem import Problem, ProblemSource
from lit_zpd.tasks.verifier import Verifier
from lit_zpd.teacher import evaluating

EngineFactory = Callable[[nn.Module], RolloutEngine]


@dataclass
class RolloutCounters:
    """Run totals, saved in checkpoints and logged as ``rollout/<name>_total``: student rollout
    tokens (the RL budget), verifier errors (responses, in training or evaluation, scored 0
    because the verifier raised), rollout prompts skipped or truncated for their length, and
    problems skipped because encoding, sampling or scoring them raised."""

    student_tokens: int = 0
    verifier_errors: int = 0
    prompts_skipped: int = 0
    prompts_truncated: int = 0
    problems_failed: int = 0

    def add(self, other: RolloutCounters) -> None:
        for name in self.names():
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


class EngineFault(RuntimeError):
    """A rollout engine failed as a whole (in generation on every prompt, or in weight sync)."""


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


def _unprofiled(action: str) -> AbstractContextManager[None]:
    return nullcontext()


class RolloutContext:
    """The typed surface of the rollout pipeline (see the module doc).

    Args:
        student: The model being trained.
        teacher: The model distilled from: a separate model, the student itself (``self_live``),
            or its starting weights (``self_initial``); ``None`` without a teacher.
        tokenizer: The shared tokenizer.
        source: The problem source; its ``verifier`` scores responses.
        engine_factory: Builds the engine that samples a model (called once per model).
        seed: The run's data seed; every stream is derived from it.
        loss: The module's loss configuration (a plan may override it per step).
        sampling: Sampling of student rollouts (``data.sampling``).
        teacher_sampling: Sampling of teacher responses (``data.teacher_sampling``).
        eval_samples: ``k`` of the mean accuracy over ``k`` samples in :meth:`evaluate`.
        eval_sampling: Sampling of those samples (greedy accuracy is always measured).
        eval_batch_size: Problems per engine call in :meth:`evaluate`.
        prompt: How prompt text becomes tokens (chat template, length limit, stop tokens).
        rank: This process's rank.
        world_size: Number of processes.
        pass_rates: The shared tracker; a new one if ``None``.
        counters: The run totals; new ones if ``None``.
        profile: Names a timed section (``with profile("rollout.sampling"): ...``); the data module
            passes the trainer's profiler (``trainer.profiler: simple`` reports them).
    """

    def __init__(
        self,
        *,
        student: nn.Module,
        teacher: Any,
        tokenizer: Any,
        source: ProblemSource,
        engine_factory: EngineFactory,
        seed: int,
        loss: LossConfig,
        sampling: SamplingConfig = SamplingConfig(),
        teacher_sampling: SamplingConfig | None = None,
        eval_samples: int = 0,
        eval_sampling: SamplingConfig = SamplingConfig(),
        eval_batch_size: int = 64,
        prompt: PromptFormat = PromptFormat(),
        rank: int = 0,
        world_size: int = 1,
        pass_rates: PassRateTracker | None = None,
        counters: RolloutCounters | None = None,
        profile: Callable[[str], AbstractContextManager[Any]] | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.student = student
        self.teacher = teacher
        self.tokenizer = tokenizer
        self.source = source
        self.seed = seed
        self.loss = loss
        self.sampling = sampling
        self.teacher_sampling = teacher_sampling or sampling
        self.eval_samples = eval_samples
        self.eval_sampling = eval_sampling
        self.eval_batch_size = eval_batch_size
        self.prompt_format = prompt
        self.rank = rank
        self.world_size = world_size
        self.pass_rates = pass_rates if pass_rates is not None else PassRateTracker()
        self.counters = counters if counters is not None else RolloutCounters()
        self.policy_version = 0  # optimizer steps of the current weights; engines sync when it moves
        self.sync_seconds = 0.0  # weight-sync time since the pipeline last reset it
        self.profile = profile or _unprofiled  # timed sections: rollout.sampling, rollout.weight_sync
        self._engine_factory = engine_factory
        self._engines: dict[int, RolloutEngine] = {}
        self._synced: dict[int, int] = {}
        self._pending = RolloutCounters()  # this rank's counts since the last reduction
        self._train_index: dict[str, Problem] | None = None
        self._prompts: PromptEncoder | None = None
        self._splits: dict[str, list[Problem]] = {}
        self.overlong_problems: dict[str, int] = {}  # per split, left out because their prompt is too long

    # ----------------------------------------------------------------------------- models

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    @property
    def verifier(self) -> Verifier:
        return self.source.verifier

    def problems(self, split: str) -> list[Problem]:
        """The source's problems of ``split`` whose prompt fits (see :mod:`lit_zpd.rollout.prompts`):
        under ``overlong: skip`` the others are left out, counted in ``overlong_problems`` and
        named in a warning, once per split. Characters of prompts or answers that the tokenizer
        cannot encode are named in a warning with the problems that hold them."""
        if split not in self._splits:
            problems = self.source.problems(split)  # type: ignore[arg-type]
            if self.prompts.format.overlong == "skip" and self.prompts.max_tokens is not None:
                lengths = self.prompts.lengths([p.prompt for p in problems])
                kept = [p for p, n in zip(problems, lengths) if n <= self.prompts.max_tokens]
                if len(kept) < len(problems):
                    self.overlong_problems[split] = len(problems) - len(kept)
                    if self.rank == 0:
                        warnings.warn(
                            f"{len(problems) - len(kept)} of {len(problems)} {split} problems are left out: their prompt "
                            f"is longer than {self.prompts.max_tokens} tokens (data.prompt.max_tokens, overlong: skip)",
                            stacklevel=2,
                        )
                problems = kept
            if self.rank == 0:
                _warn_lost_characters(self.prompts, split, problems)
            self._splits[split] = problems
        return list(self._splits[split])

    def problem(self, problem_id: str) -> Problem:
        """The training problem with this id (replay buffers and curricula keep ids only)."""
        if self._train_index is None:
            self._train_index = {p.problem_id: p for p in self.problems("train")}
        try:
            return self._train_index[problem_id]
        except KeyError:
            raise KeyError(
                f"no training problem has id {problem_id!r} (a checkpoint's ids stop matching when the run resumes "
                "with another data.source or data.prompt setting that leaves other problems out)"
            ) from None

    @property
    def prompts(self) -> PromptEncoder:
        """The prompt encoder; its default length limit is the shortest context of the student and
        a teacher with weights of its own, less the longest ``max_new_tokens`` of the run."""
        if self._prompts is None:
            limit = self.prompt_format.max_tokens
            if limit is None:
                lengths = [n for n in (context_length(self.student), context_length(self.teacher)) if n is not None]
                longest = max(s.max_new_tokens for s in (self.sampling, self.teacher_sampling, self.eval_sampling))
                limit = min(lengths) - longest if lengths else None
            self._prompts = PromptEncoder(self.tokenizer, self.prompt_format, limit)
        return self._prompts

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt as the models read it (:meth:`PromptEncoder.encode`)."""
        return self.prompts.encode(text)

    def fitting(self, problems: list[Problem], *prompts: Callable[[Problem], str]) -> list[Problem]:
        """The problems each of whose prompts ``f(problem)`` (a privileged context, say) fits the
        limit; all of them under ``overlong: truncate``, where encoding cuts the rest. For
        measurements that build prompts outside a rollout, which :meth:`admit` does not see."""
        if self.prompts.max_tokens is None or self.prompts.format.overlong == "truncate":
            return list(problems)
        return [p for p in problems if all(self.prompts.fits(f(p)) for f in prompts)]

    def admit(self, specs: list[PromptSpec]) -> list[PromptSpec]:
        """The specs whose prompts fit, before they are answered: under ``overlong: skip`` the
        others are dropped, under ``truncate`` they are kept and will be cut; both are counted.
        The student's prompt is checked, and the teacher's when a privileged one is set."""
        if self.prompts.max_tokens is None:
            return specs
        kept = []
        for spec in specs:
            texts = [spec.student_prompt] + ([spec.teacher_prompt] if spec.teacher_prompt else [])
            if all(self.prompts.fits(t) for t in texts):
                kept.append(spec)
            elif self.prompts.format.overlong == "truncate":
                self._pending.prompts_truncated += 1
                kept.append(spec)
            else:
                self._pending.prompts_skipped += 1
        return kept

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens (responses; prompts go through
        :meth:`encode_prompt`)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def engine_for(self, model: Any) -> RolloutEngine:
        """The engine sampling ``model`` (built on first use), synced to ``model``'s weights when
        the policy version moved since its last sync."""
        key = id(model)
        if key not in self._engines:
            self._engines[key] = self._engine_factory(model)
        if self._synced.get(key) != self.policy_version:
            start = time.perf_counter()
            try:
                with self.profile("rollout.weight_sync"):
                    self._engines[key].sync_weights(model)
            except Exception as error:
                raise EngineFault(
                    f"the {type(self._engines[key]).__name__} engine failed to take the weights of optimizer step "
                    f"{self.policy_version}: {type(error).__name__}: {error}"
                ) from error
            self.sync_seconds += time.perf_counter() - start
            self._synced[key] = self.policy_version
        return self._engines[key]

    # ----------------------------------------------------------------------------- scoring

    def score(self, spec: PromptSpec, token_ids: list[list[int]], logprobs: list[list[float]] | None = None) -> RolloutGroup:
        """Decode and verify completions of ``spec``. A response on which the verifier raises
        scores 0 and is counted (``rollout/verifier_errors_total``); the run goes on."""
        texts = [self.decode(ids) for ids in token_ids]
        return RolloutGroup(
            spec=spec, token_ids=token_ids, texts=texts,
            rewards=[self.reward(t, spec.problem.answer) for t in texts], sampling_logprobs=logprobs,
        )

    def skip_problem(self, where: str, problem: Problem, stage: str, error: BaseException) -> None:
        """Count a problem left out of ``where`` (``rollout 12``, ``evaluation``) because
        ``stage`` raised, and name it in a warning (``rollout/problems_failed_total``)."""
        self._pending.problems_failed += 1
        warnings.warn(
            f"rank {self.rank}, {where}: problem {problem.problem_id!r} skipped, {stage} raised "
            f"{type(error).__name__}: {error}",
            stacklevel=3,
        )

    def generate(
        self, engine: RolloutEngine, where: str, problems: list[Problem], prompts: list[list[int]], n: int,
        sampling: SamplingConfig,
    ) -> list[tuple[int, list[Completion]]]:
        """``n`` completions of each prompt, as ``(index, completions)`` pairs, in one engine call.
        When that call raises, each prompt is sampled alone to find the problems that make it
        raise (skipped: :meth:`skip_problem`); an engine that fails on every prompt is an
        :class:`EngineFault`."""
        if not prompts:
            return []
        try:
            return list(enumerate(engine.generate(prompts, n, sampling)))
        except Exception as error:  # noqa: BLE001 - isolated below, or re-raised as an engine fault
            first = error
        answered, failed = [], []
        for index, ids in enumerate(prompts):
            try:
                answered.append((index, engine.generate([ids], n, sampling)[0]))
            except Exception as error:  # noqa: BLE001 - as above
                failed.append((index, error))
        if not answered:
            raise EngineFault(
                f"the {type(engine).__name__} engine failed on every prompt of {where} "
                f"(weights of optimizer step {self.policy_version}): {type(first).__name__}: {first}"
            ) from first
        for index, error in failed:
            self.skip_problem(where, problems[index], "sampling", error)
        return answered

    def reward(self, response: str, answer: str) -> float:
        """The verifier's score of one response; 0 (and counted) if it raises."""
        try:
            return float(self.verifier.score(response, answer))
        except Exception:  # noqa: BLE001 - a user's verifier may raise anything on a strange response
            self._pending.verifier_errors += 1
            return 0.0

    def extract_answer(self, response: str) -> str | None:
        """The verifier's reading of a response's final answer; ``None`` (and counted) if it raises."""
        try:
            return self.verifier.extract(response)
        except Exception:  # noqa: BLE001 - as in reward
            self._pending.verifier_errors += 1
            return None

    @torch.no_grad()
    def response_logits(
        self, model: Any, prompt_ids: list[list[int]], response_ids: list[list[int]], rows_per_forward: int = 8
    ) -> Tensor:
        """``(N, V)`` float32 logits, on CPU, at the positions that predict the response tokens of
        each ``prompt + response`` row (teacher forcing, row after row, ``N`` their total length),
        cut to the tokenizer's vocabulary (heads are often padded past it). ``model`` runs in eval
        mode without gradient, ``rows_per_forward`` rows per pass."""
        out = []
        vocab = len(self.tokenizer)
        for start in range(0, len(prompt_ids), rows_per_forward):
            input_ids, attention_mask, response_mask = pack_rows(
                prompt_ids[start : start + rows_per_forward], response_ids[start : start + rows_per_forward],
                self.tokenizer.pad_token_id,
            )
            with evaluating(model):
                logits = model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)).logits
            out.append(logits[:, :-1, :vocab][response_mask[:, 1:].bool().to(logits.device)].float().cpu())
        return torch.cat(out) if out else torch.zeros(0, len(self.tokenizer))

    def response_logprobs(self, model: Any, prompts: list[str], responses: list[str]) -> list[Tensor]:
        """Per-token log-probabilities of each ``response`` read after its ``prompt`` by ``model``
        (:meth:`sequence_logprobs` of their tokens). This rank's pairs only; shard and
        :meth:`gather` for a global figure."""
        return self.sequence_logprobs(model, [self.encode_prompt(p) for p in prompts], [self.tokenize(r) for r in responses])

    @torch.no_grad()
    def sequence_logprobs(
        self, model: Any, prompt_ids: list[list[int]], response_ids: list[list[int]], rows_per_forward: int = 8
    ) -> list[Tensor]:
        """Per-token log-probabilities of each response's tokens after its prompt's under ``model``
        (teacher forcing in eval mode, ``rows_per_forward`` rows per pass, through the fused head of
        :func:`lit_zpd.forward.response_logprobs`): one ``(len(response),)`` float32 tensor per
        pair, on CPU."""
        out = []
        for start in range(0, len(prompt_ids), rows_per_forward):
            rows = pack_rows(
                prompt_ids[start : start + rows_per_forward], response_ids[start : start + rows_per_forward],
                self.tokenizer.pad_token_id,
            )
            with evaluating(model):
                out.append(response_logprobs(model, *(t.to(self.device) for t in rows), len(self.tokenizer)).cpu())
        picked = torch.cat(out) if out else torch.zeros(0)
        return list(picked.split([len(ids) for ids in response_ids]))

    # ----------------------------------------------------------------------------- randomness

    @contextmanager
    def seeded(self, *keys: object) -> Iterator[None]:
        """Seed torch's generator (engines draw from it) for a block, from the run's seed, ``keys``
        and the rank: rank 0's stream is a single process's, every other rank has its own."""
        rank = (("rank", self.rank),) if self.rank else ()
        with seeded(self.seed, *keys, *rank):
            yield

    def rng(self, *keys: object, per_rank: bool = False) -> random.Random:
        """A Python random stream from the run's seed and ``keys``; the same on every rank unless
        ``per_rank``. Derive it from the rollout index to keep a hook's draws resumable without
        saving a generator state."""
        rank = (("rank", self.rank),) if per_rank and self.rank else ()
        return random.Random(repr((self.seed, *keys, *rank)))

    # ----------------------------------------------------------------------------- ranks

    def count_student_tokens(self, n: int) -> None:
        """Add ``n`` student rollout tokens sampled on this rank for training (the RL budget).
        Counted before the pipeline's gather of a rollout, they are in that rollout's total."""
        self._pending.student_tokens += n

    def reduce_counters(self, parts: list[RolloutCounters]) -> None:
        """Add every rank's pending counts (from a gather) to the run totals."""
        for part in parts:
            self.counters.add(part)

    def take_pending(self) -> RolloutCounters:
        """This rank's counts since the last call, to be gathered and reduced."""
        pending, self._pending = self._pending, RolloutCounters()
        return pending

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (``[obj]`` in one process). Every rank must call it."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    # ----------------------------------------------------------------------------- evaluation

    def evaluate(self, model: Any, problems: list[Problem], *, samples: int | None = None, budget: bool = False) -> EvalBatch:
        """Greedy correctness and mean correctness over ``samples`` samples (``eval_samples`` if
        ``None``; 0 for greedy only) of ``problems`` (any subset: a split, one skill). The problems
        are shared out over the ranks and the results gathered, in the order given, on every rank.
        With ``budget`` the tokens generated here count as student rollout tokens (a curriculum's
        probes of the student)."""
        shard = problems[self.rank :: self.world_size]
        local = EvalBatch.concat(
            [
                self.evaluate_batch(model, shard[i : i + self.eval_batch_size], samples=samples, budget=budget)
                for i in range(0, len(shard), self.eval_batch_size)
            ]
        )
        if self.world_size == 1:
            return local
        parts = self.gather(local)
        gathered = EvalBatch.concat(parts)
        if gathered.size == len(problems):
            starts = list(itertools.accumulate([0] + [part.size for part in parts]))
            # Problem j was evaluated on rank j % W, as that rank's row j // W.
            return gathered.take([starts[j % self.world_size] + j // self.world_size for j in range(len(problems))])
        # Some problems were skipped (skip_problem): back in the order given, by id.
        row = {pid: i for i, pid in enumerate(gathered.problem_ids)}
        return gathered.take([row[p.problem_id] for p in problems if p.problem_id in row])

    def evaluate_batch(self, model: Any, problems: list[Problem], *, samples: int | None = None, budget: bool = False) -> EvalBatch:
        """:meth:`evaluate` of one batch on this rank alone."""
        engine = self.engine_for(model)
        samples = self.eval_samples if samples is None else samples
        encoded = []
        for problem in problems:
            try:
                encoded.append((problem, self.encode_prompt(problem.prompt)))
            except Exception as error:  # noqa: BLE001 - a bad row may make a tokenizer raise anything
                self.skip_problem("evaluation", problem, "tokenising its prompt", error)
        greedy = self.generate(
            engine, "evaluation", [p for p, _ in encoded], [ids for _, ids in encoded], 1,
            SamplingConfig(0.0, 1.0, self.eval_sampling.max_new_tokens),
        )
        problems, prompts = [encoded[i][0] for i, _ in greedy], [encoded[i][1] for i, _ in greedy]
        texts = [self.decode(g[0].token_ids) for _, g in greedy]
        generated = sum(len(g[0].token_ids) for _, g in greedy)
        batch = EvalBatch(
            problem_ids=[p.problem_id for p in problems],
            skills=[p.skill for p in problems],
            prompts=[p.prompt for p in problems],
            greedy_correct=torch.tensor([self.reward(t, p.answer) for p, t in zip(problems, texts)]),
            greedy_texts=texts,
        )
        if samples:
            with self.seeded("eval"):
                sampled = self.generate(engine, "evaluation", problems, prompts, samples, self.eval_sampling)
            if len(sampled) < len(problems):  # a problem that raises only when sampled: leave it out
                batch = batch.take([i for i, _ in sampled])
                problems = [problems[i] for i, _ in sampled]
            generated += sum(len(c.token_ids) for _, group in sampled for c in group)
            batch.sample_pass_rate = torch.tensor(
                [sum(self.reward(self.decode(c.token_ids), p.answer) for c in group) / len(group)
                 for p, (_, group) in zip(problems, sampled)]
            )
        if budget:
            self.count_student_tokens(generated)
        return batch


def _warn_lost_characters(prompts: PromptEncoder, split: str, problems: list[Problem], shown: int = 5) -> None:
    """Warn, naming the characters and the first ``shown`` problems holding them, when the
    tokenizer loses characters of prompts or answers (see :meth:`PromptEncoder.lost_characters`)."""
    lost = prompts.lost_characters([p.prompt + p.answer + (p.reference or "") for p in problems])
    if not lost:
        return
    holding = [p.problem_id for p in problems if lost & set(p.prompt + p.answer + (p.reference or ""))]
    warnings.warn(
        f"the tokenizer cannot encode {''.join(sorted(lost))!r}, found in {len(holding)} {split} problems "
        f"(first: {', '.join(holding[:shown])}): prompts are read without these characters, and an answer holding "
        "one can never be scored right; rewrite them (e.g. x for ×) or use a tokenizer that has them",
        stacklevel=3,
    )
