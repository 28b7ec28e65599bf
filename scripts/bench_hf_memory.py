"""Peak memory of HF ``generate`` rollouts with sampled log-probs, against the number of new tokens.

    python scripts/bench_hf_memory.py                 # V = 151,936; 16 rows; 64, 128, 256 new tokens
    python scripts/bench_hf_memory.py --quick         # 32 and 64 new tokens

Two ways to get each sampled token's log-probability, each point in a fresh process:
- ``all_logits``: ``generate(output_logits=True)`` keeps every step's ``(rows, V)`` logits, then
  one log-softmax over ``(rows, steps, V)`` (how the HF engine worked before
  :class:`lit_zpd.rollout.hf_engine.SampledLogprobs`);
- ``stepwise``: :class:`lit_zpd.rollout.hf_engine.HFEngine`, whose logits processor keeps one step.

The model is a randomly initialised Qwen3 with a Qwen-size vocabulary (hidden 256, 2 layers); its
end-of-sequence id is a suppressed padding row, so every completion has exactly the requested
length. The peak is the growth of the resident set over what the process held before the call.
Both paths must give the same tokens and log-probabilities (checked). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB = 151_936
PAD_ROWS = 64  # the head has rows past the tokenizer; the EOS id is one of them, never sampled


# glibc serves allocations of at least this size with mmap and returns them on free, so the
# resident set follows the live tensors (its default threshold adapts to earlier frees).
MEASURED_ENV = os.environ | {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def point(path: str, new_tokens: int, rows: int) -> dict[str, object]:
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    from lit_zpd.rollout.engine import SamplingConfig
    from lit_zpd.rollout.hf_engine import HFEngine

    torch.set_num_threads(2)
    config = Qwen3Config(
        vocab_size=VOCAB + PAD_ROWS, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).eval()
    eos = VOCAB + 1
    prompts = [[(7 * r + 3 * i) % VOCAB for i in range(16)] for r in range(rows)]
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=new_tokens)

    def all_logits() -> tuple[list[list[int]], list[list[float]]]:
        ids = torch.tensor(prompts)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids),
                generation_config=GenerationConfig(
                    do_sample=True, temperature=1.0, top_k=0, max_new_tokens=new_tokens, pad_token_id=0, eos_token_id=[eos],
                    suppress_tokens=list(range(VOCAB, VOCAB + PAD_ROWS)), output_logits=True, return_dict_in_generate=True,
                ),
            )
        tokens = out.sequences[:, ids.shape[1]:]
        logits = torch.stack(out.logits, dim=1)[..., :VOCAB].float()  # (rows, steps, V)
        logprobs = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
        return tokens.tolist(), logprobs.tolist()

    def stepwise() -> tuple[list[list[int]], list[list[float]]]:
        engine = HFEngine(model, pad_token_id=0, eos_token_id=eos, vocab_size=VOCAB, batch_size=rows)
        out = [group[0] for group in engine.generate(prompts, 1, sampling)]
        return [c.token_ids for c in out], [c.logprobs for c in out]

    run = all_logits if path == "all_logits" else stepwise
    torch.manual_seed(1)
    run()  # warm-up of 1 token would not allocate; a full call settles the allocator
    before = _rss_mib()
    torch.manual_seed(2)
    tokens, logprobs = run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mib": max(0.0, peak - before), "tokens": tokens, "logprobs": logprobs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", default="64,128,256")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--point", nargs=2, metavar=("PATH", "NEW_TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.new_tokens = "32,64"
    if args.point:
        print(json.dumps(point(args.point[0], int(args.point[1]), args.rows)))
        return
    print(f"V = {VOCAB:,}, {args.rows} rows, a fresh process per point\n")
    print("| new tokens | all step logits: peak MiB | step by step: peak MiB | ratio | same tokens and log-probs |")
    print("|---:|---:|---:|---:|---|")
    for n in [int(x) for x in args.new_tokens.split(",")]:
        got = {}
        for path in ("all_logits", "stepwise"):
            done = subprocess.run([sys.executable, __file__, "--point", path, str(n), "--rows", str(args.rows)], capture_output=True, text=True, env=MEASURED_ENV)
            if done.returncode != 0:
                raise SystemExit(f"{path} at {n} new tokens failed:\n{done.stderr[-2000:]}")
            got[path] = json.loads(done.stdout.strip().splitlines()[-1])
        a, s = got["all_logits"], got["stepwise"]
        same = a["tokens"] == s["tokens"] and all(
            abs(x - y) < 1e-4 for ra, rs in zip(a["logprobs"], s["logprobs"]) for x, y in zip(ra, rs)
        )
        print(f"| {n} | {a['peak_mib']:.0f} | {s['peak_mib']:.0f} | {s['peak_mib'] / max(a['peak_mib'], 1e-9):.3f} | {'yes' if same else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
