#!/usr/bin/env bash
# A real Kubernetes control plane on 127.0.0.1, built from upstream sources (test/controlplane/go.mod):
# etcd, kube-apiserver (RBAC, the default admission plugins, service-account tokens),
# kube-controller-manager, kube-scheduler, and KWOK simulating a CPU node and two GPU nodes.
#
#   scripts/cluster.sh build             build the binaries into .tools/bin (seconds when cached)
#   scripts/cluster.sh check             exit 1, naming what is missing, unless everything is built
#   scripts/cluster.sh up                start it; prints `export KUBECONFIG=...`
#   scripts/cluster.sh status            which components run, and the nodes
#   scripts/cluster.sh restart NAME      stop and start one component (etcd, kube-apiserver, ...)
#   scripts/cluster.sh down              stop everything and remove the cluster's folder
#
# KUBEQUANT_CLUSTER_DIR (default .kubequant/cluster) holds certificates, data, logs and kubeconfigs;
# several clusters can run at once in different folders. Nothing listens beyond loopback.
# KUBEQUANT_AUDIT_POLICY: an audit policy file for kube-apiserver (its log: logs/audit.log).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${KUBEQUANT_TOOLS_BIN:-$ROOT/.tools/bin}
DIR=${KUBEQUANT_CLUSTER_DIR:-$ROOT/.kubequant/cluster}
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)
BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl helm kwok controller-gen)
MONITORING_CRDS=$ROOT/.tools/crds/monitoring.coreos.com
# LeaderWorkerSet (its CRD, its webhooks' manifest and its controller, lws-manager) and the Gateway API
# Inference Extension's InferencePool CRD, from their upstream modules at these versions.
LWS_VERSION=v0.9.0
INFERENCE_EXTENSION_VERSION=v1.6.0
SERVING_CRDS=$ROOT/.tools/crds/serving
LWS_WEBHOOKS=$ROOT/.tools/lws/webhooks.yaml

log() { echo "cluster: $*" >&2; }
die() { log "$*"; exit 1; }

build() {
  command -v go >/dev/null || die "Go is needed to build the control plane (Go 1.26: https://go.dev/dl); not found on PATH"
  mkdir -p "$BIN"
  log "building ${BINARIES[*]} into $BIN (test/controlplane/go.mod; first time: about 16 minutes on 2 cores)"
  (
    cd "$ROOT/test/controlplane"
    # The version the binaries report (kubectl version, helm's kubeVersion checks), as Kubernetes'
    # own build sets it with -X; otherwise they say v0.0.0-master.
    local version minor x=""
    version=$(GOFLAGS=-mod=mod go list -m -f '{{.Version}}' k8s.io/kubernetes)
    minor=$(echo "$version" | cut -d. -f2)
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      x+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
    done
    GOFLAGS=-mod=mod GOBIN="$BIN" go install -ldflags="-s -w$x" tool
  )
  # etcd's main package is the module go.etcd.io/etcd/server/v3, which go installs as "server".
  if [ -x "$BIN/server" ]; then mv -f "$BIN/server" "$BIN/etcd"; fi
  # The Prometheus Operator's CRDs (ServiceMonitor, PrometheusRule, ...) from its API types, for the
  # chart's all-on test: generated into a temporary folder, moved into place when complete.
  local tmp=$MONITORING_CRDS.tmp
  rm -rf "$tmp" && mkdir -p "$tmp"
  (cd "$ROOT/test/controlplane" && GOFLAGS=-mod=mod "$BIN/controller-gen" crd:crdVersions=v1 \
    paths=github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1 output:crd:dir="$tmp")
  rm -rf "$MONITORING_CRDS" && mv "$tmp" "$MONITORING_CRDS"
  build_serving_extensions
}

# The directory of module@version in the module cache (downloaded through the Go module proxy).
module_dir() {
  local scratch
  scratch=$(mktemp -d)
  (cd "$scratch" && go mod init kubequant.io/fetch >/dev/null 2>&1 &&
    GOFLAGS=-mod=mod go mod download -json "$1" | python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')
  rm -rf "$scratch"
}

build_serving_extensions() {
  local lws gaie src tmp=$SERVING_CRDS.tmp
  lws=$(module_dir "sigs.k8s.io/lws@$LWS_VERSION")
  gaie=$(module_dir "sigs.k8s.io/gateway-api-inference-extension@$INFERENCE_EXTENSION_VERSION")
  rm -rf "$tmp" && mkdir -p "$tmp" "$(dirname "$LWS_WEBHOOKS")"
  # lws-manager also runs a DisaggregatedSet controller, which exits without its CRD.
  cp "$lws/config/crd/bases/leaderworkerset.x-k8s.io_leaderworkersets.yaml" \
     "$lws/config/crd/bases/disaggregatedset.x-k8s.io_disaggregatedsets.yaml" \
     "$gaie/config/crd/bases/inference.networking.k8s.io_inferencepools.yaml" "$tmp/"
  cp "$lws/config/webhook/manifests.yaml" "$LWS_WEBHOOKS"
  rm -rf "$SERVING_CRDS" && mv "$tmp" "$SERVING_CRDS"
  if [ ! -x "$BIN/lws-manager" ]; then
    # Built in its own module (its own dependency versions), from a writable copy of the cache's.
    src=$(mktemp -d)
    cp -r "$lws/." "$src" && chmod -R u+w "$src"
    log "building lws-manager $LWS_VERSION (first time: about 5 minutes on 2 cores)"
    (cd "$src" && GOFLAGS=-mod=mod go build -ldflags="-s -w" -o "$BIN/lws-manager.tmp" ./cmd) &&
      mv "$BIN/lws-manager.tmp" "$BIN/lws-manager"
    rm -rf "$src"
  fi
}

check() {  # exit 1, naming what is missing, unless every binary and the generated CRDs are there
  local missing=()
  for b in "${BINARIES[@]}"; do [ -x "$BIN/$b" ] || missing+=("$b"); done
  [ -d "$MONITORING_CRDS" ] || missing+=("the monitoring.coreos.com CRDs")
  [ -d "$SERVING_CRDS" ] && [ -f "$LWS_WEBHOOKS" ] || missing+=("the LeaderWorkerSet and InferencePool CRDs")
  [ -x "$BIN/lws-manager" ] || missing+=("lws-manager")
  [ ${#missing[@]} -eq 0 ] && return 0
  log "missing in $BIN: ${missing[*]}"
  return 1
}

need_binaries() { check || build; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

pki() {
  local p=$DIR/pki
  mkdir -p "$p"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=kubequant-test-ca" \
    -keyout "$p/ca.key" -out "$p/ca.crt" 2>/dev/null
  # name subject [extension]: a key and a certificate signed by the cluster's CA.
  sign() {
    openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$p/$1.key" -out "$p/$1.csr" 2>/dev/null
    printf '%s\n' "${3:-extendedKeyUsage=clientAuth}" > "$p/$1.ext"
    openssl x509 -req -in "$p/$1.csr" -CA "$p/ca.crt" -CAkey "$p/ca.key" -CAcreateserial -days 3650 \
      -extfile "$p/$1.ext" -out "$p/$1.crt" 2>/dev/null
  }
  sign apiserver "/CN=kube-apiserver" \
    "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
extendedKeyUsage=serverAuth"
  sign admin "/O=system:masters/CN=kubequant-admin"
  sign controller-manager "/CN=system:kube-controller-manager"
  sign scheduler "/CN=system:kube-scheduler"
  sign kwok "/O=system:masters/CN=kwok"
  openssl genrsa -out "$p/sa.key" 2048 2>/dev/null
  openssl rsa -in "$p/sa.key" -pubout -out "$p/sa.pub" 2>/dev/null
}

kubeconfig() {  # user -> $DIR/user.kubeconfig, with the client certificate embedded
  local file=$DIR/$1.kubeconfig k=("$BIN/kubectl" --kubeconfig "$DIR/$1.kubeconfig")
  "${k[@]}" config set-cluster kubequant-test --server="https://127.0.0.1:$API_PORT" \
    --certificate-authority="$DIR/pki/ca.crt" --embed-certs=true >/dev/null
  "${k[@]}" config set-credentials "$1" --client-certificate="$DIR/pki/$1.crt" \
    --client-key="$DIR/pki/$1.key" --embed-certs=true >/dev/null
  "${k[@]}" config set-context kubequant-test --cluster=kubequant-test --user="$1" >/dev/null
  "${k[@]}" config use-context kubequant-test >/dev/null
  chmod 600 "$file"
}

write_commands() {
  local c=$DIR/cmd p=$DIR/pki AUDIT_FLAGS=""
  # An audit policy (bench/operator_bench.py counts the operator's requests with one).
  if [ -n "${KUBEQUANT_AUDIT_POLICY:-}" ]; then
    AUDIT_FLAGS="--audit-policy-file=$KUBEQUANT_AUDIT_POLICY --audit-log-path=$DIR/logs/audit.log --audit-log-maxsize=0"
  fi
  mkdir -p "$c"
  cat > "$c/etcd" <<EOF
exec "$BIN/etcd" --name=default --data-dir="$DIR/etcd" \\
  --listen-client-urls=http://127.0.0.1:$ETCD_PORT --advertise-client-urls=http://127.0.0.1:$ETCD_PORT \\
  --listen-peer-urls=http://127.0.0.1:$ETCD_PEER_PORT --initial-advertise-peer-urls=http://127.0.0.1:$ETCD_PEER_PORT \\
  --initial-cluster=default=http://127.0.0.1:$ETCD_PEER_PORT --unsafe-no-fsync=true --log-level=warn
EOF
  cat > "$c/kube-apiserver" <<EOF
exec "$BIN/kube-apiserver" --etcd-servers=http://127.0.0.1:$ETCD_PORT \\
  --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port=$API_PORT \\
  --tls-cert-file="$p/apiserver.crt" --tls-private-key-file="$p/apiserver.key" --client-ca-file="$p/ca.crt" \\
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \\
  --service-account-key-file="$p/sa.pub" --service-account-signing-key-file="$p/sa.key" \\
  --authorization-mode=RBAC --anonymous-auth=false --service-cluster-ip-range=10.96.0.0/16 \\
  --endpoint-reconciler-type=none --profiling=false --v=1 $AUDIT_FLAGS
EOF
  cat > "$c/kube-controller-manager" <<EOF
exec "$BIN/kube-controller-manager" --kubeconfig="$DIR/controller-manager.kubeconfig" \\
  --authentication-kubeconfig="$DIR/controller-manager.kubeconfig" --authorization-kubeconfig="$DIR/controller-manager.kubeconfig" \\
  --bind-address=127.0.0.1 --secure-port=$CM_PORT --leader-elect=false \\
  --service-account-private-key-file="$p/sa.key" --root-ca-file="$p/ca.crt" --use-service-account-credentials=true \\
  --cluster-signing-cert-file="$p/ca.crt" --cluster-signing-key-file="$p/ca.key" --profiling=false --v=1
EOF
  cat > "$c/kube-scheduler" <<EOF
exec "$BIN/kube-scheduler" --kubeconfig="$DIR/scheduler.kubeconfig" \\
  --authentication-kubeconfig="$DIR/scheduler.kubeconfig" --authorization-kubeconfig="$DIR/scheduler.kubeconfig" \\
  --bind-address=127.0.0.1 --secure-port=$SCHED_PORT --leader-elect=false --profiling=false --v=1
EOF
  cat > "$c/kwok" <<EOF
exec "$BIN/kwok" --kubeconfig="$DIR/kwok.kubeconfig" --config="$ROOT/test/controlplane/kwok.yaml" \\
  --manage-all-nodes=false --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \\
  --node-ip=10.0.0.1 --cidr=10.244.0.0/16 --node-lease-duration-seconds=40
EOF
}

running() { [ -f "$DIR/pids/$1" ] && kill -0 "$(cat "$DIR/pids/$1")" 2>/dev/null; }

start() {
  mkdir -p "$DIR/pids" "$DIR/logs"
  setsid bash "$DIR/cmd/$1" >>"$DIR/logs/$1.log" 2>&1 < /dev/null &
  echo $! > "$DIR/pids/$1"
}

stop() {
  running "$1" || return 0
  local pid
  pid=$(cat "$DIR/pids/$1")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$DIR/pids/$1"
}

wait_for() {  # what, seconds, command...
  local what=$1 seconds=$2; shift 2
  for _ in $(seq $((seconds * 5))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  die "$what not ready after ${seconds}s; see $DIR/logs"
}

apiserver_ready() {
  curl -sf --cacert "$DIR/pki/ca.crt" --cert "$DIR/pki/admin.crt" --key "$DIR/pki/admin.key" \
    "https://127.0.0.1:$API_PORT/readyz" | grep -q ok
}

K() { "$BIN/kubectl" --kubeconfig "$DIR/admin.kubeconfig" "$@"; }

up() {
  need_binaries
  if [ -f "$DIR/ports.env" ] && running kube-apiserver; then
    log "already up in $DIR"
    echo "export KUBECONFIG=$DIR/admin.kubeconfig"
    return 0
  fi
  rm -rf "$DIR"
  mkdir -p "$DIR"
  {
    echo "ETCD_PORT=$(free_port)"; echo "ETCD_PEER_PORT=$(free_port)"; echo "API_PORT=$(free_port)"
    echo "CM_PORT=$(free_port)"; echo "SCHED_PORT=$(free_port)"
  } > "$DIR/ports.env"
  # shellcheck source=/dev/null
  . "$DIR/ports.env"
  pki
  for user in admin controller-manager scheduler kwok; do kubeconfig "$user"; done
  write_commands
  start etcd
  wait_for etcd 30 curl -sf "http://127.0.0.1:$ETCD_PORT/health"
  start kube-apiserver
  wait_for kube-apiserver 90 apiserver_ready
  start kube-controller-manager
  start kube-scheduler
  start kwok
  K apply -f "$ROOT/test/controlplane/nodes.yaml" >/dev/null
  wait_for "the default ServiceAccount" 60 K get serviceaccount default -n default
  wait_for "the simulated nodes" 60 K wait --for=condition=Ready node --all --timeout=1s
  log "up: Kubernetes $("$BIN/kube-apiserver" --version | awk '{print $2}') on https://127.0.0.1:$API_PORT, logs in $DIR/logs"
  echo "export KUBECONFIG=$DIR/admin.kubeconfig"
}

down() {
  for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do stop "${COMPONENTS[$i]}"; done
  rm -rf "$DIR"
  log "down"
}

status() {
  [ -f "$DIR/ports.env" ] || { log "not up ($DIR)"; return 1; }
  local ok=0
  for c in "${COMPONENTS[@]}"; do
    if running "$c"; then echo "$c: running (pid $(cat "$DIR/pids/$c"))"; else echo "$c: stopped"; ok=1; fi
  done
  if running kube-apiserver; then K get nodes -o wide; fi
  return $ok
}

restart() {
  [ -f "$DIR/ports.env" ] || die "not up ($DIR)"
  # shellcheck source=/dev/null
  . "$DIR/ports.env"
  local name=${1:?restart needs a component: ${COMPONENTS[*]}}
  [ -f "$DIR/cmd/$name" ] || die "unknown component $name; one of: ${COMPONENTS[*]}"
  stop "$name"
  start "$name"
  if [ "$name" = kube-apiserver ]; then wait_for kube-apiserver 90 apiserver_ready; fi
  log "restarted $name"
}

case "${1:-}" in
  build) build ;;
  check) check ;;
  up) up ;;
  down) down ;;
  status) status ;;
  restart) shift; restart "$@" ;;
  *) echo "usage: $0 build|check|up|down|status|restart COMPONENT" >&2; exit 2 ;;
esac
