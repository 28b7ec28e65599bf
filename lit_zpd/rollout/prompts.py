"""From problem text to prompt tokens: the chat template, the length limit and the stop tokens.

Every prompt a model reads (a student's problem, a reformulated prompt, a privileged teacher's
context, an evaluation prompt) becomes tokens through one :class:`PromptEncoder`, so a chat model
sees its template everywhere and a response always starts where the model's turn starts.

- **Chat template.** When the tokenizer has one (an instruct model's) the text is sent as one user
  message, after an optional system message, with the generation prompt appended; a tokenizer
  without one (the embedded character tokenizer) reads the raw text. ``chat_template: false``
  turns the template off, ``true`` requires one.
- **Length.** A prompt longer than ``max_tokens`` (by default the model's context length less the
  longest generation of the run's sampling settings) is skipped or, with ``overlong: truncate``,
  loses the start of its text: the chat template (system message, turn markers, generation
  prompt) stays whole and the end of the user message is kept. Under ``skip``, problems whose
  plain prompt is too long are dropped from their split when the run starts (a warning names how
  many); prompts that hooks build later (reformulated, privileged) are checked per rollout and
  counted in ``rollout/prompts_skipped_total``. Under ``truncate`` every rollout prompt that is cut
  is counted in ``rollout/prompts_truncated_total`` (a long problem once per draw).
- **Stop tokens.** A completion ends at the tokenizer's end-of-sequence token or at any of
  ``stop_tokens`` (an instruct model may close its turn with another special token), which it
  includes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

Overlong = Literal["skip", "truncate"]


class PromptTooLong(ValueError):
    """A prompt is longer than the limit and ``overlong`` is ``skip``."""


@dataclass(frozen=True)
class PromptFormat:
    """How prompt text becomes tokens (YAML key ``data.prompt``; see the module doc).

    Args:
        chat_template: Apply the tokenizer's chat template: ``None`` when it has one, ``True``
            (an error without one) or ``False`` (raw text).
        system: A system message placed before the user message; ``None`` leaves the template's
            default (SmolLM2's names itself).
        max_tokens: Longest prompt, in tokens after the template; ``None`` takes the model's
            context length (``max_position_embeddings``) less the longest ``max_new_tokens`` of
            the run's sampling settings.
        overlong: What happens to a longer prompt: ``skip`` (its problem sits out) or
            ``truncate`` (its first tokens are cut).
        stop_tokens: Tokens, besides the end-of-sequence token, that end a completion; each must
            be one token of the vocabulary (``"<|endoftext|>"``).
    """

    chat_template: bool | None = None
    system: str | None = None
    max_tokens: int | None = None
    overlong: Overlong = "skip"
    stop_tokens: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"data.prompt.max_tokens must be >= 1, got {self.max_tokens}")
        if self.overlong not in ("skip", "truncate"):
            raise ValueError(f"data.prompt.overlong must be 'skip' or 'truncate', got {self.overlong!r}")


def context_length(model: Any) -> int | None:
    """The longest sequence ``model`` (or a model config) takes: its config's
    ``max_position_embeddings`` or ``n_positions``; ``None`` when it states none."""
    config = getattr(model, "config", model)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class PromptEncoder:
    """Encodes prompt text for one tokenizer under a :class:`PromptFormat`.

    Args:
        tokenizer: The run's tokenizer.
        settings: The settings; defaults if ``None``.
        max_tokens: The length limit in force (the format's, or one derived from the models by
            the caller); ``None`` for none.

    Example::

        encoder = PromptEncoder(tokenizer, PromptFormat(system="Reason step by step."), max_tokens=1024)
        encoder.encode("47+38=?\\n")   # the chat-formatted prompt's token ids
    """

    def __init__(self, tokenizer: Any, settings: PromptFormat | None = None, max_tokens: int | None = None) -> None:
        settings = settings or PromptFormat()
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if settings.chat_template and not has_template:
            raise ValueError("data.prompt.chat_template is true but the tokenizer has no chat template")
        if settings.system is not None and not (has_template and settings.chat_template is not False):
            raise ValueError("data.prompt.system needs the tokenizer's chat template (the tokenizer has none or it is off)")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(
                f"prompts may hold {max_tokens} tokens: the model's context is shorter than the longest generation; "
                "lower the sampling max_new_tokens or set data.prompt.max_tokens"
            )
        self.tokenizer = tokenizer
        self.format = settings
        self.max_tokens = max_tokens
        self.templated = has_template and settings.chat_template is not False
        self.stop_ids = [tokenizer.eos_token_id, *(self._token_id(t) for t in settings.stop_tokens)]
        self._affixes = self._template_affixes() if self.templated else ("", "")
        self.full = lru_cache(maxsize=2**16)(self._full)  # type: ignore[method-assign]

    def _token_id(self, token: str) -> int:
        ids = self.tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"data.prompt.stop_tokens: {token!r} is {len(ids)} tokens of this tokenizer, not one")
        return ids[0]

    def _render(self, prompt: str) -> str:
        messages = [{"role": "user", "content": prompt}]
        if self.format.system is not None:
            messages.insert(0, {"role": "system", "content": self.format.system})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _template_affixes(self) -> tuple[str, str] | None:
        """The text the template puts before and after a user message, when it places the message
        verbatim (checked on two probes); ``None`` sends every prompt through the template."""
        marker = "\x00lit-zpd\x00"
        before, found, after = self._render(marker).partition(marker)
        probe = " 12+3=?\n\n"
        return (before, after) if found and self._render(probe) == before + probe + after else None

    def text(self, prompt: str) -> str:
        """``prompt`` as the model reads it: inside the chat template when one applies."""
        if self._affixes is None:
            return self._render(prompt)
        return self._affixes[0] + prompt + self._affixes[1]

    def _full(self, prompt: str) -> list[int]:
        """Token ids of :meth:`text`, whatever their length (cached: prompts recur)."""
        return self.tokenizer(self.text(prompt), add_special_tokens=False)["input_ids"]

    def truncated(self, prompt: str) -> str:
        """The longest end of ``prompt`` whose encoding (template included) fits the limit: the
        start of the text is cut, never the template around it. Raises ``PromptTooLong`` when the
        template alone is over the limit."""
        assert self.max_tokens is not None
        if len(self.full("")) > self.max_tokens:
            raise PromptTooLong(f"the chat template alone is longer than the prompt limit of {self.max_tokens} tokens")
        low, high = 0, len(prompt)  # prompt[high:] fits; find the smallest start that does
        while low < high:
            mid = (low + high) // 2
            if len(self.full(prompt[mid:])) <= self.max_tokens:
                high = mid
            else:
                low = mid + 1
        return prompt[high:]

    def lost_characters(self, texts: list[str]) -> set[str]:
        """The characters of ``texts`` that do not survive encoding and decoding (a character
        tokenizer maps ``€`` to its unknown token, which decoding drops): an answer holding one
        can never be written, a prompt holding one is read without it."""
        characters = sorted({c for text in texts for c in text if not c.isspace()})
        if not characters:
            return set()
        ids = self.tokenizer(characters, add_special_tokens=False)["input_ids"]
        return {c for c, i in zip(characters, ids) if c not in self.tokenizer.decode(i, skip_special_tokens=True)}

    def lengths(self, prompts: list[str]) -> list[int]:
        """Token counts of many prompts, in one tokenizer call."""
        return [len(ids) for ids in self.tokenizer([self.text(p) for p in prompts], add_special_tokens=False)["input_ids"]]

    def fits(self, prompt: str) -> bool:
        """Whether ``prompt`` is within the limit."""
        return self.max_tokens is None or len(self.full(prompt)) <= self.max_tokens

    def encode(self, prompt: str) -> list[int]:
        """The prompt's token ids; under ``overlong: truncate`` a prompt over the limit is
        :meth:`truncated`.

        Raises:
            PromptTooLong: under ``overlong: skip`` for a prompt over the limit (the pipeline
                checks with :meth:`fits` first and leaves such problems out).
        """
        ids = self.full(prompt)
        if self.max_tokens is None or len(ids) <= self.max_tokens:
            return list(ids)
        if self.format.overlong == "truncate":
            return list(self.full(self.truncated(prompt)))
        raise PromptTooLong(
            f"a prompt of {len(ids)} tokens is longer than the limit of {self.max_tokens} (data.prompt.max_tokens, "
            f"overlong: skip): {prompt[:80]!r}..."
        )
