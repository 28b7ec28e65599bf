"""Peak memory and time of the fused divergence against the plain one, at a Qwen-size vocabulary.

    python scripts/bench_divergence.py                  # V = 151,936, H = 1024, N = 1024, 2048, 4096
    python scripts/bench_divergence.py --quick          # a smaller vocabulary: a minute
    python scripts/bench_divergence.py --ns 512,1024 --vocab 32000 --beta 0.5

Each point (path, N) runs in a fresh process: the student and teacher heads and hidden states are
made first, then a forward and backward of ``sum_i w_i D(p_S || p_T)_i`` (generalized JSD with
``--beta``; 1 is reverse KL) with gradients for the student's hidden states and head. The peak is
the growth of the process's resident set over what it held before the loss (``ru_maxrss``
against the current RSS, glibc told to return every allocation of 128 KiB or more on free), so
the inputs and the weights are not counted, but the head's gradient is, in both paths. Time is the
fastest of ``--repeats`` calls after a warm-up at N = 64. The plain path is
:func:`lit_zpd.losses.generalized_jsd` on full logits with autograd; the fused one is
:func:`lit_zpd.losses.linear_divergence` with its default chunk size (or ``--chunk-size``). Prints
a markdown table; ratios are fused / plain, measured side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# glibc serves allocations of at least this size with mmap and returns them on free, so the
# resident set follows the live tensors (its default threshold adapts to earlier frees).
MEASURED_ENV = os.environ | {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def point(path: str, n: int, vocab: int, hidden: int, beta: float, threads: int, chunk_size: int | None, repeats: int) -> dict[str, float]:
    """One measurement in this process."""
    import torch

    from lit_zpd.losses import LinearHead, default_chunk_size, generalized_jsd, linear_divergence

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    s_head = torch.nn.Linear(hidden, vocab, bias=False)
    t_head = torch.nn.Linear(hidden, vocab, bias=False).requires_grad_(False)
    with torch.no_grad():
        s_head.weight.normal_(0, 0.02, generator=g)
        t_head.weight.normal_(0, 0.02, generator=g)

    def run(rows: int) -> None:
        s_hidden = torch.randn(rows, hidden, generator=g).requires_grad_(True)
        t_hidden = torch.randn(rows, hidden, generator=g)
        weights = torch.full((rows,), 1.0 / rows)
        if path == "plain":
            loss = (weights * generalized_jsd(s_head(s_hidden), t_head(t_hidden), beta)).sum()
        else:
            loss, _, _ = linear_divergence(s_hidden, LinearHead.of(s_head), t_hidden, LinearHead.of(t_head), weights, beta, chunk_size=chunk_size)
        loss.backward()
        s_head.weight.grad = None

    run(64)
    before = _rss_mib()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(n)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"seconds": min(times), "peak_mib": max(0.0, peak - before), "chunk_size": chunk_size or default_chunk_size(vocab, hidden)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ns", default="1024,2048,4096", help="token counts, comma-separated")
    parser.add_argument("--beta", type=float, default=1.0, help="generalized JSD beta (1: reverse KL, 0: forward KL)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, help="tokens per chunk of the fused path (default: its own)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per point; the fastest counts")
    parser.add_argument("--quick", action="store_true", help="vocab 32,000 and N = 256, 512")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("--point", nargs=2, metavar=("PATH", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.vocab, args.ns = 32_000, "256,512"
    if args.point:
        print(json.dumps(point(args.point[0], int(args.point[1]), args.vocab, args.hidden, args.beta, args.threads, args.chunk_size, args.repeats)))
        return
    ns = [int(n) for n in args.ns.split(",")]
    print(f"V = {args.vocab:,}, H = {args.hidden}, beta = {args.beta}, {args.threads} threads; a fresh process per point\n")
    print("| N | plain peak MiB | fused peak MiB | peak ratio | plain s | fused s | time ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for n in ns:
        got = {}
        for path in ("plain", "fused"):
            cmd = [sys.executable, __file__, "--point", path, str(n), "--vocab", str(args.vocab),
                   "--hidden", str(args.hidden), "--beta", str(args.beta), "--threads", str(args.threads),
                   "--repeats", str(args.repeats), *(["--chunk-size", str(args.chunk_size)] if args.chunk_size else [])]
            done = subprocess.run(cmd, capture_output=True, text=True, env=MEASURED_ENV)
            if done.returncode != 0:
                got[path] = {"seconds": float("nan"), "peak_mib": float("nan"), "error": done.stderr.strip().splitlines()[-1:] or [str(done.returncode)]}
            else:
                got[path] = json.loads(done.stdout.strip().splitlines()[-1])
        p, f = got["plain"], got["fused"]
        print(f"| {n} | {p['peak_mib']:.0f} | {f['peak_mib']:.0f} | {f['peak_mib'] / p['peak_mib']:.3f} | "
              f"{p['seconds']:.2f} | {f['seconds']:.2f} | {f['seconds'] / p['seconds']:.2f} |", flush=True)
        rows.append({"n": n, **{f"{k}_{path}": v for path in got for k, v in got[path].items()}})
    print(f"\nfused chunk size: {rows[0].get('chunk_size_fused', '?')} tokens")
    if args.json:
        args.json.write_text(json.dumps({"vocab": args.vocab, "hidden": args.hidden, "beta": args.beta, "points": rows}, indent=1))


if __name__ == "__main__":
    main()
