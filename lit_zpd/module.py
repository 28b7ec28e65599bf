"""DistillModule: one LightningModule for SFT, distillation and policy-gradient training.

The student is any Hugging Face causal LM directory (optionally wrapped in LoRA by peft); the
optional teacher is frozen and must share the student's tokenizer. The loss is a weighted sum of
terms chosen in YAML (:class:`LossConfig`); every term is a per-token quantity reduced with the
batch's per-sample ``weights``. Divergences and log-probabilities are computed from the final
hidden states chunk by chunk (see :mod:`lit_zpd.losses`), so the full ``tokens x vocabulary``
logits tensor is never built.

Batches come from :class:`~lit_zpd.rollout.datamodule.RolloutDataModule`; the module trains
correctly with no pedagogical callback attached.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import peft
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torchmetrics import MeanMetric
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from typing_extensions import override

from lit_zpd.assets import resolve
from lit_zpd.losses import (
    Aggregation,
    aggregate,
    chunked_token_divergence,
    chunked_token_logprobs,
    clipped_policy_loss,
    sampled_token_kl_advantage,
)
from lit_zpd.report import accuracy_table, forgetting, solved, summarize

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
TEACHER_TERMS = (*DIVERGENCES, "on_policy_distill")
ROLLOUT_TERMS = ("policy", "on_policy_distill")


@dataclass
class LossConfig:
    """Coefficients of the loss terms (0 switches a term off) and their settings.

    Args:
        sft: Cross-entropy on the batch's response tokens.
        forward_kl: Token-level KL(p_T || p_S) over the vocabulary.
        reverse_kl: Token-level KL(p_S || p_T) over the vocabulary.
        jsd: Generalized JSD with ``jsd_beta`` (GKD).
        policy: PPO clipped surrogate on the batch's advantages (GRPO); needs student rollouts.
        on_policy_distill: Clipped policy gradient with the per-token advantage
            ``-(log p_S(y_t) - log p_T(y_t))`` on student rollouts (sampled-token reverse KL).
        jsd_beta: Teacher weight in the JSD mixture; 0 is forward KL, 1 reverse KL.
        temperature: Softening of both distributions in the divergences.
        clip_low: PPO lower clip range.
        clip_high: PPO upper clip range.
        dual_clip: Dual-clip constant (> 1) or ``None``.
        aggregation: ``sample``: mean over samples of each sample's token mean; ``token``: mean over
            all response tokens of the batch.
        chunk_size: Tokens per chunk when building logits from hidden states.
    """

    sft: float = 0.0
    forward_kl: float = 0.0
    reverse_kl: float = 0.0
    jsd: float = 0.0
    policy: float = 0.0
    on_policy_distill: float = 0.0
    jsd_beta: float = 0.5
    temperature: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    aggregation: Aggregation = "sample"
    chunk_size: int = 1024

    def __post_init__(self) -> None:
        for name in ("sft", *DIVERGENCES, *ROLLOUT_TERMS):
            if getattr(self, name) < 0:
                raise ValueError(f"model.loss.{name} must be >= 0, got {getattr(self, name)}")
        if not self.active:
            raise ValueError("model.loss: set at least one coefficient (sft, forward_kl, reverse_kl, jsd, policy, ...)")
        if not 0 <= self.jsd_beta <= 1:
            raise ValueError(f"model.loss.jsd_beta must be in [0, 1], got {self.jsd_beta}")
        if self.temperature <= 0:
            raise ValueError(f"model.loss.temperature must be > 0, got {self.temperature}")
        if self.chunk_size < 1:
            raise ValueError(f"model.loss.chunk_size must be >= 1, got {self.chunk_size}")
        if self.aggregation not in ("sample", "token"):
            raise ValueError(f"model.loss.aggregation must be 'sample' or 'token', got {self.aggregation!r}")
        for name in ("clip_low", "clip_high"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"model.loss.{name} must be in (0, 1), got {getattr(self, name)}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"model.loss.dual_clip must be > 1 or null, got {self.dual_clip}")

    @property
    def active(self) -> dict[str, float]:
        """Terms with a non-zero coefficient."""
        return {n: getattr(self, n) for n in ("sft", *DIVERGENCES, *ROLLOUT_TERMS) if getattr(self, n) > 0}


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
    """Student, optional frozen teacher, and the configured loss terms.

    Args:
        student: Hugging Face model directory of the student, or ``embedded:student``.
        teacher: Directory of the frozen teacher, ``embedded:teacher``, or ``None``.
        tokenizer: Tokenizer directory; the student's directory if ``None``.
        init_from_config: Build the student from its ``config.json`` with fresh weights (seeded by
            ``init_seed``) instead of loading weights; how the embedded models are trained.
        init_seed: Seed of that initialisation.
        loss: Loss coefficients and settings; ``None`` means SFT only. Coefficients not given are 0.
        lora: Train LoRA adapters instead of all weights.
        optimizer: Optimizer factory (LightningCLI: ``class_path`` and ``init_args``).
        lr_scheduler: Learning-rate scheduler factory, stepped after every optimizer step.
        report_start_end: Evaluate student and teacher on the validation split before training
            and the student after, and print the accuracies side by side.
        log_samples_every_n_steps: Period of decoded rollouts and histograms in TensorBoard.
        num_logged_samples: Decoded rollouts written each time.

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
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        report_start_end: bool = True,
        log_samples_every_n_steps: int = 50,
        num_logged_samples: int = 4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        loss = loss if loss is not None else LossConfig(sft=1.0)
        if loss.active.keys() & set(TEACHER_TERMS) and teacher is None:
            raise ValueError(f"model.loss uses {sorted(loss.active.keys() & set(TEACHER_TERMS))}: set model.teacher")
        if num_logged_samples < 0:
            raise ValueError(f"model.num_logged_samples must be >= 0, got {num_logged_samples}")
        if log_samples_every_n_steps < 1:
            raise ValueError(f"model.log_samples_every_n_steps must be >= 1, got {log_samples_every_n_steps}")
        self.loss_config = loss
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.report_start_end = report_start_end
        self.log_samples_every_n_steps = log_samples_every_n_steps
        self.num_logged_samples = num_logged_samples
        self.tokenizer = AutoTokenizer.from_pretrained(resolve(tokenizer or student))
        if self.tokenizer.pad_token is None:  # many causal LM tokenizers ship none; padding is masked anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.student = _load_student(resolve(student), init_from_config, init_seed)
        if lora is not None:
            self.student = peft.get_peft_model(
                self.student,
                peft.LoraConfig(
                    r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                    target_modules=lora.target_modules, task_type="CAUSAL_LM",
                ),
            )
        self.teacher = _load_teacher(resolve(teacher), self.tokenizer) if teacher is not None else None
        self.eval_metrics = nn.ModuleDict()
        self.start_report: dict[str, dict[str, float]] = {}
        self.end_report: dict[str, dict[str, float]] = {}
        self.start_solved: list[str] = []  # validation problems the student solved greedily at the start

    # ----------------------------------------------------------------------------- helpers

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @override
    def train(self, mode: bool = True) -> DistillModule:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
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
        if getattr(datamodule, "needs_teacher", False) and self.teacher is None:
            raise ValueError("data asks for teacher samples: set model.teacher")
        on_policy_only = self.loss_config.active.keys() & set(ROLLOUT_TERMS)
        if on_policy_only and (datamodule.lmbda is not None or datamodule.data_source != "student"):
            raise ValueError(
                f"model.loss uses {sorted(on_policy_only)}, which need student rollouts: "
                "set data.data_source: student and data.lmbda: null"
            )
        for skill in [*datamodule.skills, "all"]:
            for kind in ("greedy", "mean_at_k", "partial_fraction"):
                self.eval_metrics[f"{kind}/{skill}"] = MeanMetric()

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}
        checkpoint["start_report"] = self.start_report
        checkpoint["start_solved"] = self.start_solved

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The frozen teacher is not saved; take it from its own directory so loading stays strict.
        if self.teacher is not None:
            checkpoint["state_dict"].update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
        self.start_report = checkpoint.get("start_report", {})
        self.start_solved = checkpoint.get("start_solved", [])

    # ----------------------------------------------------------------------------- training

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        terms, diagnostics = self.loss_terms(batch)
        loss = sum(self.loss_config.active[name] * value for name, value in terms.items())
        size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        for name, value in (terms | diagnostics).items():
            self.log(f"train/{name}", value, batch_size=size)
        self._log_rollout(batch)
        return loss

    def loss_terms(self, batch: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Every active loss term as a scalar (before its coefficient), and diagnostics to log."""
        cfg = self.loss_config
        mask = batch["response_mask"][:, 1:].bool()  # (B, T-1): positions that predict a response token
        targets = batch["input_ids"][:, 1:][mask]  # (N,)
        hidden = _final_hidden(self.student, batch["input_ids"], batch["attention_mask"])[:, :-1][mask]  # (N, H)
        head = _head(self.student, len(self.tokenizer))

        def reduce(values: Tensor) -> Tensor:  # (N,) -> scalar, weighted per sample
            per_token = values.new_zeros(mask.shape)
            per_token[mask] = values
            return aggregate(per_token, mask, batch["weights"], cfg.aggregation)

        terms: dict[str, Tensor] = {}
        diagnostics: dict[str, Tensor] = {}
        if cfg.sft:
            terms["sft"] = reduce(-chunked_token_logprobs(hidden, head, targets, 1.0, cfg.chunk_size))
        if cfg.active.keys() & set(TEACHER_TERMS):
            t_hidden, t_head = self._teacher_hidden(batch, targets.shape[0])
        for name, beta in (("forward_kl", 0.0), ("reverse_kl", 1.0), ("jsd", cfg.jsd_beta)):
            if getattr(cfg, name):
                values = chunked_token_divergence(hidden, head, t_hidden, t_head, beta, cfg.temperature, cfg.chunk_size)
                terms[name] = reduce(values)
        if cfg.policy or cfg.on_policy_distill:
            old = batch["sampling_logprobs"][:, 1:][mask]
            logp = chunked_token_logprobs(hidden, head, targets, batch["sampling_temperature"], cfg.chunk_size)
            clip = {"clip_low": cfg.clip_low, "clip_high": cfg.clip_high, "dual_clip": cfg.dual_clip}
            if cfg.policy:
                advantages = batch["advantages"][:, None].expand_as(mask)[mask]
                terms["policy"] = reduce(clipped_policy_loss(logp, old, advantages, **clip))
            if cfg.on_policy_distill:
                with torch.no_grad():
                    student_lp = chunked_token_logprobs(hidden, head, targets, 1.0, cfg.chunk_size)
                    teacher_lp = chunked_token_logprobs(t_hidden, t_head, targets, 1.0, cfg.chunk_size)
                advantages = sampled_token_kl_advantage(student_lp, teacher_lp)
                terms["on_policy_distill"] = reduce(clipped_policy_loss(logp, old, advantages, **clip))
                diagnostics["sampled_reverse_kl"] = -advantages.mean()
        return terms, diagnostics

    def _teacher_hidden(self, batch: dict[str, Any], n_tokens: int) -> tuple[Tensor, Any]:
        assert self.teacher is not None
        t_mask = batch["teacher_response_mask"][:, 1:].bool()
        with torch.no_grad():
            t_hidden = _final_hidden(self.teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"])
        t_hidden = t_hidden[:, :-1][t_mask]
        if t_hidden.shape[0] != n_tokens:
            raise RuntimeError(f"teacher sees {t_hidden.shape[0]} response tokens, the student {n_tokens}")
        return t_hidden, _head(self.teacher, len(self.tokenizer))

    def _log_rollout(self, batch: dict[str, Any]) -> None:
        size = batch["input_ids"].shape[0]
        lengths = batch["response_mask"].sum(-1).float()
        pass_rate = batch["pass_rate"]
        metrics = {
            "rollout/reward_mean": batch["rewards"].mean(),
            "rollout/response_length": lengths.mean(),
            "rollout/pass_rate_mean": pass_rate.mean(),
            "rollout/pass_rate_zero_fraction": (pass_rate == 0).float().mean(),
            "rollout/pass_rate_one_fraction": (pass_rate == 1).float().mean(),
            "rollout/policy_lag": float(self.global_step - batch["policy_version"]),
            "rollout/on_policy": float(batch["source"] == "student"),
        }
        if not batch.get("minibatch_index"):  # once per rollout, not per PPO minibatch
            metrics["rollout/weight_sync_seconds"] = float(batch.get("sync_seconds", 0.0))
            metrics["rollout/student_tokens_total"] = float(batch.get("student_tokens_total", 0))
        self.log_dict(metrics, batch_size=size)
        logger = self.logger
        if not isinstance(logger, TensorBoardLogger) or self.global_step % self.log_samples_every_n_steps:
            return
        writer = logger.experiment
        writer.add_histogram("rollout/pass_rate", pass_rate, self.global_step)
        writer.add_histogram("rollout/response_length", lengths, self.global_step)
        writer.add_histogram("train/sample_weight", batch["weights"], self.global_step)
        # One row of every kind first (plain, bcq, ncq, ...), so reformulated prompts show up too.
        kinds = batch["kinds"]
        first = [kinds.index(k) for k in dict.fromkeys(kinds)]
        rows = (first + [i for i in range(size) if i not in first])[: self.num_logged_samples]
        text = "\n\n".join(
            f"**{batch['problem_ids'][i]}** ({kinds[i]}, reward {batch['rewards'][i]:.0f})\n\n"
            + (f"prompt:\n```\n{batch['prompts'][i]}\n```\ncompletion:\n" if "prompts" in batch else "")
            + f"```\n{batch['completions'][i]}\n```"
            for i in rows
        )
        writer.add_text(f"rollout/samples_{batch['source']}", text, self.global_step)

    # ----------------------------------------------------------------------------- evaluation

    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        for i, skill in enumerate(batch["skills"]):
            for key in (skill, "all"):
                self.eval_metrics[f"greedy/{key}"].update(batch["greedy_correct"][i])
                if "sample_pass_rate" in batch:
                    pass_rate = batch["sample_pass_rate"][i]
                    self.eval_metrics[f"mean_at_k/{key}"].update(pass_rate)
                    self.eval_metrics[f"partial_fraction/{key}"].update(float(0 < pass_rate < 1))

    @override
    def on_validation_epoch_end(self) -> None:
        for name, metric in self.eval_metrics.items():
            if metric.update_called:
                self.log(f"eval/{name}", metric.compute())
            metric.reset()

    @override
    def on_train_start(self) -> None:
        if not self.report_start_end or self.start_report:  # a resumed run keeps its real start
            return
        models = {"student": self.student} | ({"teacher": self.teacher} if self.teacher is not None else {})
        results = {name: self.trainer.datamodule.evaluate(m) for name, m in models.items()}
        self.start_report = {name: summarize(r) for name, r in results.items()}
        self.start_solved = solved(results["student"])
        self._log_report("start", self.start_report)
        self.print(accuracy_table({f"{n} (start)": r for n, r in self.start_report.items()}))

    @override
    def on_train_end(self) -> None:
        if not self.report_start_end:
            return
        results = self.trainer.datamodule.evaluate(self.student)
        # Forgetting: of the problems solved at the start, the share the student now fails.
        self.end_report = {"student": summarize(results) | forgetting(self.start_solved, results)}
        self._log_report("end", self.end_report)
        columns = {f"{n} (start)": r for n, r in self.start_report.items()} | {"student (end)": self.end_report["student"]}
        self.print(accuracy_table(columns))

    def _log_report(self, when: str, report: dict[str, dict[str, float]]) -> None:
        if self.logger is None:
            return
        metrics = {f"eval/{when}/{model}/{key}": value for model, r in report.items() for key, value in r.items()}
        self.logger.log_metrics(metrics, step=self.global_step)


def _load_student(path: str, init_from_config: bool, seed: int) -> PreTrainedModel:
    if init_from_config:
        config = AutoConfig.from_pretrained(path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()


def _load_teacher(path: str, student_tokenizer: Any) -> PreTrainedModel:
    try:
        teacher_tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"model.teacher: no tokenizer found in {path}; the teacher must ship its tokenizer") from err
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise ValueError(
            f"model.teacher: the tokenizer in {path} differs from the student's "
            f"({len(teacher_tokenizer)} vs {len(student_tokenizer)} tokens); token-level distillation needs one tokenizer"
        )
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    teacher.requires_grad_(False)
    return teacher.eval()


def _final_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Last hidden states ``(B, T, H)`` from the decoder body, without the output head."""
    return model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _head(model: nn.Module, vocab: int) -> Any:
    """The output head restricted to the tokenizer's ids (heads are often padded past them)."""
    head = model.get_output_embeddings()
    return lambda h: head(h)[..., :vocab]


