"""DistillModule: one LightningModule for SFT, distillation and policy-gradient training.

The student is any Hugging Face causal LM directory (optionally wrapped in LoRA by peft); the
optional teacher is a frozen model sharing the student's tokenizer, or the student itself
(:mod:`lit_zpd.teacher`). The teacher reads each row's completion after its own prompt
(``teacher_input_ids``), which may hold a privileged context the student does not see. The loss is a weighted sum of
terms chosen in YAML (:class:`LossConfig`); every term is a per-token quantity reduced with the
batch's per-sample ``weights``. Divergences and log-probabilities are computed from the final
hidden states by the fused losses of :mod:`lit_zpd.losses` (loss and gradients chunk by chunk in
the forward pass), so the full ``tokens x vocabulary`` logits tensor is never built.

Batches (:class:`~lit_zpd.rollout.batch.RolloutBatch`) come from
:class:`~lit_zpd.rollout.datamodule.RolloutDataModule`; a batch may carry the loss of its step (a
hook's setting), else ``model.loss`` applies. The module trains correctly with no pedagogical
callback attached; rollout logging and the start/end report are callbacks
(:mod:`lit_zpd.callbacks.rollout_logging`, :mod:`lit_zpd.callbacks.report`).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import peft
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric
from transformers import AutoModelForCausalLM, PreTrainedModel
from typing_extensions import override

from lit_zpd.assets import resolve
from lit_zpd.forward import final_hidden, output_head
from lit_zpd.loss_config import DIVERGENCES, ROLLOUT_TERMS, TEACHER_TERMS, LossConfig
from lit_zpd.losses import (
    LinearHead,
    clipped_policy_loss,
    linear_divergence,
    linear_logprob_loss,
    linear_token_logprobs,
    sampled_token_kl_advantage,
    token_weights,
)
from lit_zpd.micro_batch import micro_batched, row_parts
from lit_zpd.model_files import load_causal_lm, load_config, load_tokenizer
from lit_zpd.rollout.batch import EvalBatch, RolloutBatch
from lit_zpd.teacher import SELF_TEACHERS, AdaptersDisabled, evaluating, load_teacher

__all__ = ["DIVERGENCES", "ROLLOUT_TERMS", "TEACHER_TERMS", "DistillModule", "LoraSettings", "LossConfig"]

Precision = Literal["float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoraSettings:
    """LoRA adapters on the student (peft).

    Args:
        r: Rank.
        alpha: Scaling numerator (``lora_alpha``).
        dropout: Dropout on the adapter input.
        target_modules: Names of the linear layers that get adapters.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


# Hyperparameters saved in checkpoints hold these; let ``torch.load(weights_only=True)`` read them.
torch.serialization.add_safe_globals([LossConfig, LoraSettings])


class DistillModule(LightningModule):
    """Student, optional teacher, and the configured loss terms.

    Args:
        student: Hugging Face model directory of the student, or ``embedded:student``.
        teacher: The teacher: a model directory (or ``embedded:teacher``) of a frozen model with the
            student's tokenizer; ``self_live`` (the student's current weights, no gradient);
            ``self_initial`` (its starting weights: the base with LoRA adapters disabled, or a
            frozen copy); or ``None``.
        tokenizer: Tokenizer directory; the student's directory if ``None``.
        init_from_config: Build the student from its ``config.json`` with fresh weights (seeded by
            ``init_seed``) instead of loading weights; how the embedded models are trained.
        init_seed: Seed of that initialisation.
        loss: Loss coefficients and settings; ``None`` means SFT only. Coefficients not given are 0.
        lora: Train LoRA adapters instead of all weights.
        student_dtype: The dtype the student's weights are stored and trained in. ``bfloat16`` or
            ``float16`` halve its memory but the optimizer then updates low-precision weights;
            to keep float32 weights and compute in bfloat16 use ``trainer.precision: bf16-mixed``
            with ``float32`` here (see the README's precision section).
        teacher_dtype: The dtype of a teacher loaded from a directory (it never trains, so
            ``bfloat16`` halves its memory at little cost); ``None``: the student's. A self-teacher
            is the student's weights and has the student's dtype.
        gradient_checkpointing: Recompute the student's decoder activations in backward instead of
            keeping them (Hugging Face gradient checkpointing): less memory, about one more forward.
        micro_batch_size: Rows per forward/backward inside one optimizer step; the loss and
            gradient equal one pass over the whole batch (:mod:`lit_zpd.micro_batch`). ``None``: all
            rows at once.
        nonfinite: What a step whose loss or gradients are not finite does (decided on every
            rank alike, after the gradients are averaged): ``stop`` skips its update, ends the run
            (the final checkpoint then holds the last finite weights) and raises an error that
            says so; ``skip`` drops its update, counts it (``train/nonfinite_steps_total``) and
            goes on. A skipped step still counts as a step (the learning-rate schedule moves).
        optimizer: Optimizer factory (LightningCLI: ``class_path`` and ``init_args``).
        lr_scheduler: Learning-rate scheduler factory, stepped after every optimizer step.

    Example::

        module = DistillModule(student="embedded:student", teacher="embedded:teacher",
                               loss=LossConfig(jsd=1.0, jsd_beta=0.5))
    """

    def __init__(
        self,
        student: str = "embedded:student",
        teacher: str | None = "embedded:teacher",
        tokenizer: str | None = None,
        init_from_config: bool = False,
        init_seed: int = 0,
        loss: LossConfig | None = None,
        lora: LoraSettings | None = None,
        student_dtype: Precision = "float32",
        teacher_dtype: Precision | None = None,
        gradient_checkpointing: bool = False,
        micro_batch_size: int | None = None,
        nonfinite: Literal["stop", "skip"] = "stop",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        for key, value in (("student_dtype", student_dtype), ("teacher_dtype", teacher_dtype)):
            if value is not None and value not in DTYPES:
                raise ValueError(f"model.{key} must be one of {sorted(DTYPES)}, got {value!r}")
        if teacher_dtype not in (None, student_dtype) and teacher in SELF_TEACHERS:
            raise ValueError(f"model.teacher_dtype: {teacher} is the student's weights, in model.student_dtype={student_dtype}")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"model.micro_batch_size must be >= 1 or null, got {micro_batch_size}")
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"model.nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
        self.micro_batch_size = micro_batch_size
        self.nonfinite = nonfinite
        self.nonfinite_steps = 0  # updates dropped because the loss or a gradient was not finite
        self._loss_finite = True
        self._nonfinite_stop: str | None = None
        loss = loss if loss is not None else LossConfig(sft=1.0)
        if loss.active.keys() & set(TEACHER_TERMS) and teacher is None:
            raise ValueError(f"model.loss uses {sorted(loss.active.keys() & set(TEACHER_TERMS))}: set model.teacher")
        self.loss_config = loss
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        _check_optimizer(optimizer, lr_scheduler)
        self.tokenizer = load_tokenizer(resolve(tokenizer or student))  # pad token = EOS when it has none
        self.student = _load_student(resolve(student), init_from_config, init_seed).to(DTYPES[student_dtype])
        if gradient_checkpointing:
            self.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora is not None:
            self.student = peft.get_peft_model(
                self.student,
                peft.LoraConfig(
                    r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                    target_modules=lora.target_modules, task_type="CAUSAL_LM",
                ),
            )
        view = load_teacher(resolve(teacher), self.student, self.tokenizer) if teacher is not None else None
        if isinstance(view, PreTrainedModel) and teacher not in SELF_TEACHERS:
            view.to(DTYPES[teacher_dtype or student_dtype])
        # Only a teacher with weights of its own is a submodule (frozen, kept out of checkpoints);
        # a view of the student must not alias the student's weights in the state dict.
        self.teacher_model = view if isinstance(view, nn.Module) and view is not self.student else None
        self._adapters_off = view if isinstance(view, AdaptersDisabled) else None
        self.teacher_kind = None if teacher is None else teacher if teacher in SELF_TEACHERS else "model"
        self._warned_self = False
        self.eval_metrics = nn.ModuleDict()

    @property
    def teacher(self) -> Any:
        """The teacher as a model: a frozen model, the student itself, or the student with its
        LoRA adapters disabled; ``None`` without one."""
        if self.teacher_kind == "self_live":
            return self.student
        return self.teacher_model if self.teacher_model is not None else self._adapters_off

    # ----------------------------------------------------------------------------- helpers

    @override
    def train(self, mode: bool = True) -> DistillModule:
        super().train(mode)
        if self.teacher_model is not None:
            self.teacher_model.eval()
        return self

    @override
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory([p for p in self.student.parameters() if p.requires_grad])
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @override
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            return
        for skill in [*datamodule.skills, "all"]:
            for kind in ("greedy", "mean_at_k", "partial_fraction"):
                self.eval_metrics[f"{kind}/{skill}"] = MeanMetric()

    @override
    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Drops the update of a step whose loss or gradients are not finite (``model.nonfinite``):
        without gradients the optimizer leaves every weight and its state as they are."""
        grads = [p.grad for p in self.student.parameters() if p.grad is not None]
        finite = self._loss_finite and (not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()))
        if self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            return
        self.nonfinite_steps += 1
        for p in self.student.parameters():
            p.grad = None
        self.log("train/nonfinite_steps_total", float(self.nonfinite_steps), rank_zero_only=True)
        step = self.trainer.global_step + 1
        if self.nonfinite == "stop":
            self._nonfinite_stop = (
                f"optimizer step {step}: the loss or its gradients are not finite (the weights diverged: lower the "
                "learning rate, or set model.nonfinite: skip to drop such steps); its update was dropped, so the "
                f"weights and the final checkpoint are those of step {step - 1}"
            )
            self.trainer.should_stop = True
        else:
            rank_zero_warn(f"optimizer step {step}: the loss or its gradients are not finite; its update was dropped (model.nonfinite: skip)")

    @override
    def on_train_end(self) -> None:
        # Callbacks' on_train_end (the final checkpoint among them) has run: now fail loudly.
        if self._nonfinite_stop is not None:
            raise FloatingPointError(self._nonfinite_stop)

    @override
    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if isinstance(batch, RolloutBatch):
            return batch.to(device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["nonfinite_steps"] = self.nonfinite_steps
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher_model.")}

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_steps = int(checkpoint.get("nonfinite_steps", 0))
        # The frozen teacher is not saved; take it from where it was built so loading stays strict.
        if self.teacher_model is not None:
            checkpoint["state_dict"].update({f"teacher_model.{k}": v for k, v in self.teacher_model.state_dict().items()})

    # ----------------------------------------------------------------------------- training

    @override
    def training_step(self, batch: RolloutBatch, batch_idx: int) -> dict[str, Any]:
        """The weighted loss of one batch. Returns ``{"loss": ..., "terms": {name: value}}``: the
        terms and diagnostics (detached, this rank's) reach callbacks' ``on_train_batch_end``."""
        cfg = batch.loss or self.loss_config
        loss, terms, diagnostics = self.step_loss(batch, cfg)
        self._loss_finite = bool(torch.isfinite(loss.detach()))
        self.log("train/loss", loss, prog_bar=True, batch_size=batch.size, sync_dist=True)
        for name, value in (terms | diagnostics).items():
            self.log(f"train/{name}", value, batch_size=batch.size, sync_dist=True)
        return {"loss": loss, "terms": terms | diagnostics}

    def loss_terms(self, batch: RolloutBatch, cfg: LossConfig | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Every active loss term as a scalar (before its coefficient), and diagnostics to log, from
        one pass over all rows."""
        cfg = cfg or batch.loss or self.loss_config
        return self._row_terms(batch, *self._token_weights(batch, cfg), cfg)

    def _token_weights(self, batch: RolloutBatch, cfg: LossConfig) -> tuple[Tensor, int]:
        """Checks ``batch`` against ``cfg``; returns every token's coefficient in the step's loss,
        ``(B, T-1)``, and the step's number of response tokens."""
        self._check_batch(batch, cfg)
        mask = batch.response_mask[:, 1:].bool()  # (B, T-1): positions that predict a response token
        return token_weights(mask, batch.weights, cfg.aggregation), int(mask.sum())

    def _check_batch(self, batch: RolloutBatch, cfg: LossConfig) -> None:
        if cfg.active.keys() & set(TEACHER_TERMS) and self.teacher is None:
            raise ValueError(f"the loss uses {sorted(cfg.active.keys() & set(TEACHER_TERMS))}: set model.teacher")
        if (cfg.policy or cfg.on_policy_distill) and batch.sampling_logprobs is None:
            raise ValueError(f"the loss uses {sorted(cfg.active.keys() & set(ROLLOUT_TERMS))}, which need student rollouts")
        self._warn_if_self_teacher_sees_the_student_prompt(batch, cfg)

    def step_loss(self, batch: RolloutBatch, cfg: LossConfig) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """The weighted loss of ``batch``, its terms and diagnostics (both detached).

        With ``micro_batch_size`` the rows go through the models that many at a time
        (:mod:`lit_zpd.micro_batch`); every term is a sum over rows with coefficients fixed for
        the whole batch, so the loss and its gradient are those of one pass."""
        coefficients, n_tokens = self._token_weights(batch, cfg)

        def weighted(terms: dict[str, Tensor]) -> Tensor:
            return sum(cfg.active[name] * value for name, value in terms.items())  # type: ignore[return-value]

        parts = row_parts(batch.size, self.micro_batch_size)
        if len(parts) == 1:
            terms, diagnostics = self._row_terms(batch, coefficients, n_tokens, cfg)
            return weighted(terms), {k: v.detach() for k, v in terms.items()}, {k: v.detach() for k, v in diagnostics.items()}

        def part(rows: list[int]) -> tuple[Tensor, dict[str, Tensor]]:
            terms, diagnostics = self._row_terms(batch.take(rows), coefficients[rows], n_tokens, cfg)
            return weighted(terms), terms | {f"diagnostics/{k}": v for k, v in diagnostics.items()}

        loss, logged = micro_batched(part, parts, [p for p in self.student.parameters() if p.requires_grad])
        terms = {k: v for k, v in logged.items() if not k.startswith("diagnostics/")}
        diagnostics = {k.removeprefix("diagnostics/"): v for k, v in logged.items() if k.startswith("diagnostics/")}
        return loss, terms, diagnostics

    def _row_terms(
        self, batch: RolloutBatch, coefficients: Tensor, n_tokens: int, cfg: LossConfig
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The terms' shares from ``batch``'s rows: ``coefficients`` ``(B, T-1)`` are the token
        weights of these rows within the whole step, ``n_tokens`` the step's response tokens."""
        mask = batch.response_mask[:, 1:].bool()
        targets = batch.input_ids[:, 1:][mask]  # (N,)
        weights = coefficients[mask]  # (N,)
        with self._profile("distill.student_forward"):
            hidden = final_hidden(self.student, batch.input_ids, batch.attention_mask)[:, :-1][mask]  # (N, H)
        head = output_head(self.student, len(self.tokenizer))
        teacher = None
        if cfg.active.keys() & set(TEACHER_TERMS):
            with self._profile("distill.teacher_forward"):
                teacher = self._teacher_hidden(batch, targets.shape[0])
        chunk = cfg.chunk_size
        terms: dict[str, Tensor] = {}
        diagnostics: dict[str, Tensor] = {}
        with self._profile("distill.loss"):
            if cfg.sft:
                terms["sft"], _ = linear_logprob_loss(hidden, head, targets, lambda lp, r: -(weights[r] * lp).sum(), 1.0, chunk)
            for name, beta in (("forward_kl", 0.0), ("reverse_kl", 1.0), ("jsd", cfg.jsd_beta)):
                if getattr(cfg, name):
                    terms[name], _, unclipped = linear_divergence(
                        hidden, head, *teacher, weights, beta, cfg.temperature, cfg.entry_clip, chunk  # type: ignore[misc]
                    )
                    if cfg.entry_clip is not None:
                        diagnostics[f"{name}_unclipped"] = (weights * unclipped).sum()
            if cfg.policy or cfg.on_policy_distill:
                old = batch.sampling_logprobs[:, 1:][mask]  # type: ignore[index]
                clip = {"clip_low": cfg.clip_low, "clip_high": cfg.clip_high, "dual_clip": cfg.dual_clip}

                def surrogate(advantages: Tensor) -> Any:  # the clipped policy loss of a chunk's log-probs
                    return lambda lp, r: (weights[r] * clipped_policy_loss(lp, old[r], advantages[r], **clip)).sum()

                temperature = batch.sampling_temperature
                if cfg.policy:
                    advantages = batch.advantages[:, None].expand_as(mask)[mask]
                    terms["policy"], _ = linear_logprob_loss(hidden, head, targets, surrogate(advantages), temperature, chunk)
                if cfg.on_policy_distill:
                    student_lp = linear_token_logprobs(hidden, head, targets, 1.0, chunk)
                    teacher_lp = linear_token_logprobs(*teacher, targets, 1.0, chunk)  # type: ignore[misc]
                    kl_advantages = sampled_token_kl_advantage(student_lp, teacher_lp)
                    terms["on_policy_distill"], _ = linear_logprob_loss(hidden, head, targets, surrogate(kl_advantages), temperature, chunk)
                    diagnostics["sampled_reverse_kl"] = -kl_advantages.sum() / max(1, n_tokens)
        return terms, diagnostics

    def _profile(self, action: str) -> Any:
        """A section timed by the trainer's profiler (``trainer.profiler: simple``), if attached."""
        return self._trainer.profiler.profile(action) if self._trainer is not None else nullcontext()

    @torch.no_grad()
    def teacher_token_logprobs(self, batch: RolloutBatch, temperature: float = 1.0) -> Tensor:
        """``(N,)`` the teacher's log-probability of every response token, read in the teacher's
        context (``teacher_input_ids``), in the order of the student's response tokens: the values
        the loss compares with the student's."""
        mask = batch.response_mask[:, 1:].bool()
        targets = batch.input_ids[:, 1:][mask]
        t_hidden, t_head = self._teacher_hidden(batch, targets.shape[0])
        return linear_token_logprobs(t_hidden, t_head, targets, temperature, self.loss_config.chunk_size)

    def _warn_if_self_teacher_sees_the_student_prompt(self, batch: RolloutBatch, cfg: LossConfig) -> None:
        if (
            self.teacher_kind in SELF_TEACHERS and cfg.active.keys() & set(TEACHER_TERMS)
            and batch.teacher_input_ids is batch.input_ids and not self._warned_self
        ):
            self._warned_self = True
            rank_zero_warn(
                f"model.teacher: {self.teacher_kind} sees exactly what the student sees (no privileged teacher prompt "
                "in the batch): the divergence to it carries no signal"
            )

    def _teacher_hidden(self, batch: RolloutBatch, n_tokens: int) -> tuple[Tensor, LinearHead]:
        t_mask = batch.teacher_response_mask[:, 1:].bool()
        with torch.no_grad(), evaluating(self.teacher):
            t_hidden = final_hidden(self.teacher, batch.teacher_input_ids, batch.teacher_attention_mask)
        t_hidden = t_hidden[:, :-1][t_mask]
        if t_hidden.shape[0] != n_tokens:
            raise RuntimeError(f"teacher sees {t_hidden.shape[0]} response tokens, the student {n_tokens}")
        return t_hidden, output_head(self.teacher, len(self.tokenizer))

    # ----------------------------------------------------------------------------- evaluation

    @override
    def validation_step(self, batch: EvalBatch, batch_idx: int) -> None:
        for i, skill in enumerate(batch.skills):
            for key in (skill, "all"):
                self.eval_metrics[f"greedy/{key}"].update(batch.greedy_correct[i])
                if batch.sample_pass_rate is not None:
                    pass_rate = batch.sample_pass_rate[i]
                    self.eval_metrics[f"mean_at_k/{key}"].update(pass_rate)
                    self.eval_metrics[f"partial_fraction/{key}"].update(float(0 < pass_rate < 1))

    @override
    def on_validation_epoch_end(self) -> None:
        for name, metric in self.eval_metrics.items():
            if metric.update_called:
                self.log(f"eval/{name}", metric.compute())
            metric.reset()


def _load_student(path: str, init_from_config: bool, seed: int) -> PreTrainedModel:
    if init_from_config:
        config = load_config(path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return load_causal_lm(path).train()


def _check_optimizer(optimizer: OptimizerCallable, lr_scheduler: LRSchedulerCallable | None) -> None:
    """Build the optimizer and scheduler once over a stand-in parameter, so that an invalid
    argument (a negative learning rate, say) is reported before the models load rather than
    when training starts."""
    try:
        built = optimizer([nn.Parameter(torch.zeros(1))])
    except (TypeError, ValueError) as error:
        raise ValueError(f"model.optimizer: {error}") from error
    if lr_scheduler is not None:
        try:
            lr_scheduler(built)
        except (TypeError, ValueError) as error:
            raise ValueError(f"model.lr_scheduler: {error}") from error

