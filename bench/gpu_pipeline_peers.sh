#!/usr/bin/env bash
# Issue 15's GPU measurements in one call of under 10 minutes on one H100/H200:
#   1. Llama-3-8B shapes (32 layers), 128 x 2048 calibration: ours, llm-compressor's oneshot and
#      GPTQModel end to end, each in its own process with a time limit, then the common layer-error score;
#   2. Llama-3-70B shapes, its first LAYERS_70B layers: ours, per-layer time, peak GPU memory, the host
#      resident set by quarter, and the projection to 80 layers.
# Prepared here (no network there):  bash bench/peer_wheels.sh .whl/py312 3.12
# Run with the device tool:          carry [".whl"], command "bash bench/gpu_pipeline_peers.sh"
# Results under $OUT: 8b.json, 70b.json, their logs, the install log and nvidia-smi's report.
set -uo pipefail
out=${OUT:-/tmp/kq-out}
work=${WORKDIR:-/tmp/kq-work}
peer_timeout=${PEER_TIMEOUT:-140}
layers_70b=${LAYERS_70B:-4}
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1
started=$SECONDS

nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" \
  > "$out/versions.txt" 2>&1
if [ -d .whl/py312 ]; then
  bash bench/install_peers.sh .whl/py312 /tmp/kq-site > "$out/install.log" 2>&1 && export PEERS_SITE=/tmp/kq-site
fi
echo "setup took $((SECONDS - started)) s"

# The peers print a line per module; the logs keep everything, the call's output only the summaries.
python3 bench/pipeline_peers_bench.py --shape llama3-8b --samples 128 --seq-len 2048 \
  --tools ours,llmcompressor,gptqmodel --timeout "$peer_timeout" --score-samples 16 \
  --workdir "$work" --json "$out/8b.json" > "$out/8b.log" 2>&1
tail -n 12 "$out/8b.log"
echo "8B done at $((SECONDS - started)) s"
rm -rf "$work"/synthetic-llama3-8b-* "$work"/out

python3 bench/pipeline_peers_bench.py --shape llama3-70b --layers "$layers_70b" --samples 128 --seq-len 2048 \
  --tools ours --no-score --workdir "$work" --json "$out/70b.json" > "$out/70b.log" 2>&1
tail -n 6 "$out/70b.log"
echo "all done at $((SECONDS - started)) s"
