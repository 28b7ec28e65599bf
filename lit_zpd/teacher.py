"""The teacher, by kind: a separate model, or the student itself (live or at its start).

``model.teacher`` takes:

- a model directory (or ``embedded:teacher``): a frozen model that shares the student's
  tokenizer;
- ``self_live``: the student's current weights, run without gradient (on-policy self-distillation
  against a moving target);
- ``self_initial``: the student's starting weights. With LoRA that is the base model with the
  adapters disabled (no copy); without LoRA a frozen copy of the student made at start.

A teacher that can be rebuilt is never saved in checkpoints: a directory teacher is reloaded from
its directory, a ``self_initial`` copy is made again from the student's directory, and the
others have no weights of their own. A self-teacher differs from the student only by what it
reads: a privileged context (a reference solution in its prompt, ``PromptSpec.teacher_prompt``,
set by a rollout hook) that reaches the module as the batch's ``teacher_input_ids``. Without one,
every divergence to a ``self_live`` teacher is 0; the module warns.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import peft
import torch
from torch import nn
from transformers import PreTrainedModel

from lit_zpd.model_files import load_causal_lm, load_tokenizer

SELF_TEACHERS = ("self_live", "self_initial")


class AdaptersDisabled:
    """A LoRA student seen with its adapters off: its starting weights, without a copy.

    Offers what the loss and the engines use of a model (forward, ``generate``, the decoder and
    the output head, ``parameters``, ``eval``/``train``); every call runs with the adapters
    disabled and without gradient.

    Args:
        student: The peft model.
    """

    def __init__(self, student: peft.PeftModel) -> None:
        self.student = student

    @contextmanager
    def _off(self) -> Iterator[None]:
        with self.student.disable_adapter(), torch.no_grad():
            yield

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._off():
            return self.student(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        with self._off():
            return self.student.generate(*args, **kwargs)

    def get_decoder(self) -> Any:
        decoder = self.student.get_base_model().get_decoder()

        def run(*args: Any, **kwargs: Any) -> Any:
            with self._off():
                return decoder(*args, **kwargs)

        return run

    def get_output_embeddings(self) -> _HeadOff:
        return _HeadOff(self)

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.student.parameters()

    @property
    def training(self) -> bool:
        return self.student.training

    def eval(self) -> AdaptersDisabled:
        self.student.eval()
        return self

    def train(self, mode: bool = True) -> AdaptersDisabled:
        self.student.train(mode)
        return self


class _HeadOff:
    """The student's output head, run with the adapters off (LoRA may target ``lm_head`` too)."""

    def __init__(self, view: AdaptersDisabled) -> None:
        self.view = view
        self.head = view.student.get_output_embeddings()

    @property
    def out_features(self) -> int:
        return self.head.out_features

    @property
    def linear(self) -> nn.Module:
        """The head as the adapters-off forward computes it: a LoRA layer's base layer."""
        return getattr(self.head, "base_layer", self.head)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        with self.view._off():
            return self.head(hidden)


@contextmanager
def evaluating(model: Any) -> Iterator[None]:
    """``model`` in eval mode (no dropout) for a block, its mode restored after: a self-teacher is
    the training student. A model already in eval mode (a frozen teacher) is left alone, which
    saves two walks over its modules per step."""
    was_training = model.training
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train(True)


def load_teacher(spec: str, student: nn.Module, student_tokenizer: Any) -> Any:
    """The teacher ``model.teacher`` names (see the module doc); ``spec`` is already resolved."""
    if spec == "self_live":
        return student
    if spec == "self_initial":
        if isinstance(student, peft.PeftModel):
            return AdaptersDisabled(student)
        frozen = copy.deepcopy(student)
        frozen.requires_grad_(False)
        return frozen.eval()
    return _load_directory(spec, student_tokenizer)


def _load_directory(path: str, student_tokenizer: Any) -> PreTrainedModel:
    try:
        teacher_tokenizer = load_tokenizer(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"model.teacher: {err}") from err
    except (OSError, ValueError) as err:
        raise ValueError(f"model.teacher: {err}; the teacher must ship its tokenizer") from err
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise ValueError(
            f"model.teacher: the tokenizer in {path} differs from the student's "
            f"({len(teacher_tokenizer)} vs {len(student_tokenizer)} tokens); token-level distillation needs one tokenizer"
        )
    teacher = load_causal_lm(path)
    teacher.requires_grad_(False)
    return teacher.eval()
