#!/usr/bin/env bash
# The real SmolLM2 pair of docs/real.md, from the GGUF file that scripts/install.sh brings from PyPI
# (nothing is downloaded here). Each step is skipped when its output exists, so a run that stopped
# goes on where it stopped. About 30 minutes on 2 CPU cores.
#
#   logs/real/smollm2       SmolLM2-135M-Instruct as a plain model directory (lit-zpd convert)
#   logs/real/teacher       SmolLM2 after SFT on the curriculum's references (configs/real/teacher_sft.yaml)
#   logs/real/student_init  every other decoder layer of the teacher: 15 of 30 layers, 81M parameters
#   logs/real/student       the student after its SFT warm-up (configs/real/student_sft.yaml)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
step() { echo "== $1"; }
if [ ! -f logs/real/smollm2/config.json ]; then
  step "convert SmolLM2-135M-Instruct (GGUF) to logs/real/smollm2"
  "$BIN/lit-zpd" convert pypi:smollm2 logs/real/smollm2
fi
if [ ! -f logs/real/teacher/config.json ]; then
  step "teacher SFT: logs/real/teacher"
  "$BIN/lit-zpd" fit --config configs/real/teacher_sft.yaml
fi
if [ ! -f logs/real/student_init/config.json ]; then
  step "layer-dropped student: logs/real/student_init"
  "$BIN/python" scripts/make_student.py logs/real/teacher logs/real/student_init
fi
if [ ! -f logs/real/student/config.json ]; then
  step "student warm-up: logs/real/student"
  "$BIN/lit-zpd" fit --config configs/real/student_sft.yaml
fi
echo "ready: .venv/bin/lit-zpd fit --config configs/real/grpo.yaml (or gkd, zppo, opsd)"
