#!/usr/bin/env bash
# The peers of bench/pipeline_peers_bench.py as files, for a machine without network (the GPU machine):
#   bash bench/peer_wheels.sh DEST [PYTHON_VERSION]       (default 3.12, the GPU image's Python)
# and there: bash bench/install_peers.sh DEST SITE, then PEERS_SITE=SITE.
# llm-compressor 0.14.0.1 with the compressed-tensors it pins, and GPTQModel 7.3.6: the newest
# GPTQModel whose requirements accept torch 2.11-2.13 and transformers 5.17-5.19 (7.4 and later want
# newer). GPTQModel and its ModelCloud helpers publish sdists only: they travel as sdists and are
# built where they run (pypcre compiles a C extension against libpcre2-8, whose header it ships).
# Only what the GPU image lacks is fetched (its torch, accelerate, numpy, pyarrow, ... are used);
# Where torchvision is missing (GPTQModel imports it; this project's CPU venv lacks it), name it
# in EXTRA_PEER_PACKAGES at the version matching the local torch (torchvision==0.28.0 for torch 2.13).
# transformers is held at 5.17.0, the newest llm-compressor 0.14 accepts, with the huggingface-hub it takes.
set -euo pipefail
dest=${1:?usage: peer_wheels.sh DEST [PYTHON_VERSION]}
py=${2:-3.12}
python=${PYTHON:-python3}
mkdir -p "$dest"
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
  "${platforms[@]}" -d "$dest" \
  llmcompressor==0.14.0.1 compressed-tensors==0.19.0 transformers==5.17.0 \
  loguru==0.7.3 pydantic==2.14.4 pydantic-core annotated-types typing-inspection \
  huggingface-hub==1.33.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 torchao nvidia-ml-py
"$python" -m pip download -q --no-deps --no-binary=:all: --no-build-isolation -d "$dest" \
  gptqmodel==7.3.6 pypcre==0.6.4 device-smi==0.5.7 tokenicer==0.0.14 logbar==0.4.15 defuser==0.0.28
ls "$dest"
du -sh "$dest"
