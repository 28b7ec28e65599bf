#!/usr/bin/env bash
# Every benchmark of docs/BENCHMARKS.md, one after the other (about 45 minutes on 2 CPU cores);
# the tables go to logs/bench/*.txt, the step-time chart to docs/images/step_breakdown.png and
# the raw numbers to docs/bench/. Run nothing else meanwhile: the timings share the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export VLLM_LOGGING_LEVEL=WARNING
out=logs/bench
mkdir -p "$out" docs/bench
smol=${SMOL_DIR:-logs/bench/smollm2}
run() { local name=$1; shift; echo "== $name: $*"; local start=$SECONDS; "$@" > "$out/$name.txt" 2>&1; echo "   $((SECONDS - start)) s"; }
run divergence .venv/bin/python scripts/bench_divergence.py --json docs/bench/divergence.json
run hf_memory .venv/bin/python scripts/bench_hf_memory.py
run lightning .venv/bin/python scripts/bench_lightning.py
run step .venv/bin/python scripts/bench_step.py --png docs/images/step_breakdown.png --json docs/bench/step_breakdown.json
[ -f "$smol/config.json" ] || run convert .venv/bin/lit-zpd convert pypi:smollm2 "$smol"
run rollout .venv/bin/python scripts/bench_rollout.py --models "student,teacher,random,$smol" --batch-sizes 64
grep -h "^|" "$out"/{divergence,hf_memory,lightning,step,rollout}.txt
