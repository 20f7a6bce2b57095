#!/usr/bin/env bash
# A real Kubernetes control plane on 127.0.0.1, built from upstream sources (test/controlplane/go.mod):
# etcd, kube-apiserver (RBAC, the default admission plugins, service-account tokens),
# kube-controller-manager, kube-scheduler, and KWOK simulating a CPU node and two GPU nodes; with
# KUBEQUANT_NODE=1 also a real node that runs containers (containerd, runc, the kubelet, kube-proxy,
# the bridge CNI) beside them.
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
#
# The real node (KUBEQUANT_NODE=1; root; one per machine): node "kubequant-node" on a bridge of its own
# (kq0, 10.244.77.1/24); the apiserver listens on that address, not on loopback, so Pods reach it
# through the `kubernetes` Service. Pods get no default route: nothing a Pod sends leaves the machine.
# KUBEQUANT_NODE_IMAGES: a folder of image archives (scripts/images.sh save) loaded into containerd.
# `down` leaves the machine as it found it: containers, mounts, iptables chains, cgroups, the bridge.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${KUBEQUANT_TOOLS_BIN:-$ROOT/.tools/bin}
DIR=${KUBEQUANT_CLUSTER_DIR:-$ROOT/.kubequant/cluster}
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)
NODE_COMPONENTS=(containerd kubelet kube-proxy)
BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl helm kwok controller-gen
  kubelet kube-proxy containerd ctr containerd-shim-runc-v2 crictl pause registry)
# The real node's runtime, from the Go module proxy at these versions.
CONTAINERD_VERSION=v2.4.2
CRI_TOOLS_VERSION=v1.37.0
REGISTRY_VERSION=v3.1.2
PAUSE_IMAGE=localhost/kubequant-pause:1
NODE=${KUBEQUANT_NODE:-0}
NODE_NAME=kubequant-node
NODE_BRIDGE=kq0
NODE_IP=10.244.77.1
NODE_POD_CIDR=10.244.77.0/24
SERVICE_CIDR=10.96.0.0/16
# Paths outside the cluster's folder that the node's components create whatever their settings: the
# kubelet's device-plugin and pod-resources sockets, runc's state, the CNI plugins' result cache, the
# Pods' network namespaces. `down` removes those that were not there before `up`.
NODE_HOST_PATHS="/var/lib/kubelet /run/containerd /var/lib/cni /run/netns"
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
  build_node_runtime
}

build_node_runtime() {  # containerd, its runc shim, crictl (to list and remove Pods) and the pause binary
  if [ ! -x "$BIN/containerd" ] || [ ! -x "$BIN/ctr" ] || [ ! -x "$BIN/containerd-shim-runc-v2" ]; then
    log "building containerd $CONTAINERD_VERSION (first time: about 4 minutes on 2 cores)"
    GOBIN="$BIN" go install -ldflags="-s -w" -tags no_btrfs \
      "github.com/containerd/containerd/v2/cmd/containerd@$CONTAINERD_VERSION" \
      "github.com/containerd/containerd/v2/cmd/ctr@$CONTAINERD_VERSION" \
      "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION"
  fi
  [ -x "$BIN/crictl" ] || GOBIN="$BIN" go install -ldflags="-s -w" "sigs.k8s.io/cri-tools/cmd/crictl@$CRI_TOOLS_VERSION"
  # The CNCF registry (distribution): the tests push the images to it as a user pushes to theirs.
  [ -x "$BIN/registry" ] || GOBIN="$BIN" go install -ldflags="-s -w" \
    "github.com/distribution/distribution/v3/cmd/registry@$REGISTRY_VERSION"
  (cd "$ROOT/test/controlplane" && CGO_ENABLED=0 go build -ldflags="-s -w" -o "$BIN/pause" ./pause)
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
    "subjectAltName=IP:127.0.0.1,IP:$NODE_IP,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
extendedKeyUsage=serverAuth"
  sign admin "/O=system:masters/CN=kubequant-admin"
  sign controller-manager "/CN=system:kube-controller-manager"
  sign scheduler "/CN=system:kube-scheduler"
  sign kwok "/O=system:masters/CN=kwok"
  sign kubelet "/O=system:nodes/CN=system:node:$NODE_NAME"
  sign kube-proxy "/CN=system:kube-proxy"
  sign apiserver-kubelet-client "/O=kubequant:apiserver/CN=kube-apiserver-kubelet-client"
  openssl genrsa -out "$p/sa.key" 2048 2>/dev/null
  openssl rsa -in "$p/sa.key" -pubout -out "$p/sa.pub" 2>/dev/null
}

kubeconfig() {  # user -> $DIR/user.kubeconfig, with the client certificate embedded
  local file=$DIR/$1.kubeconfig k=("$BIN/kubectl" --kubeconfig "$DIR/$1.kubeconfig")
  "${k[@]}" config set-cluster kubequant-test --server="https://$API_ADDRESS:$API_PORT" \
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
  # With a real node: the Node authorizer and NodeRestriction for its kubelet, the apiserver's client
  # certificate for logs, exec and port-forward, by the node's InternalIP (never a DNS lookup), and the
  # `kubernetes` Service's endpoint kept at the bridge address by the apiserver itself.
  local AUTHZ=RBAC NODE_FLAGS="--endpoint-reconciler-type=none"
  if [ "$NODE" = 1 ]; then
    AUTHZ=Node,RBAC
    NODE_FLAGS="--enable-admission-plugins=NodeRestriction --endpoint-reconciler-type=lease \\
  --kubelet-client-certificate=$p/apiserver-kubelet-client.crt --kubelet-client-key=$p/apiserver-kubelet-client.key \\
  --kubelet-preferred-address-types=InternalIP"
  fi
  cat > "$c/kube-apiserver" <<EOF
exec "$BIN/kube-apiserver" --etcd-servers=http://127.0.0.1:$ETCD_PORT \\
  --bind-address=$API_ADDRESS --advertise-address=$API_ADDRESS --secure-port=$API_PORT \\
  --tls-cert-file="$p/apiserver.crt" --tls-private-key-file="$p/apiserver.key" --client-ca-file="$p/ca.crt" \\
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \\
  --service-account-key-file="$p/sa.pub" --service-account-signing-key-file="$p/sa.key" \\
  --authorization-mode=$AUTHZ --anonymous-auth=false --service-cluster-ip-range=$SERVICE_CIDR \\
  $NODE_FLAGS --profiling=false --v=1 $AUDIT_FLAGS
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
    "https://$API_ADDRESS:$API_PORT/readyz" | grep -q ok
}

K() { "$BIN/kubectl" --kubeconfig "$DIR/admin.kubeconfig" "$@"; }

# ---- the real node ------------------------------------------------------------------------------

SOCK() { echo "$DIR/node/containerd.sock"; }
CTR() { "$BIN/ctr" --address "$(SOCK)" --namespace k8s.io "$@"; }
CRICTL() { "$BIN/crictl" --runtime-endpoint "unix://$(SOCK)" --image-endpoint "unix://$(SOCK)" --timeout 60s "$@"; }

need_node() {
  [ "$(id -u)" -eq 0 ] || die "KUBEQUANT_NODE=1 needs root (containerd, the kubelet, iptables, a bridge)"
  local missing=()
  for tool in runc ip iptables buildah podman; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  [ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ] && [ -x /usr/lib/cni/loopback ] || missing+=("the CNI plugins")
  [ ${#missing[@]} -eq 0 ] || die "the real node needs ${missing[*]} (Debian: apt-get install runc iproute2 iptables buildah podman containernetworking-plugins)"
  if ip link show "$NODE_BRIDGE" >/dev/null 2>&1; then
    die "$NODE_BRIDGE exists: another cluster's real node runs on this machine (one per machine); stop it with its own 'down'"
  fi
}

kube_chains() {  # the KUBE-* chains of every table, one "command table chain" a line
  local cmd table
  for cmd in iptables ip6tables; do
    command -v "$cmd" >/dev/null || continue
    for table in filter nat mangle; do
      "$cmd" -t "$table" -S 2>/dev/null | awk -v c="$cmd" -v t="$table" '$1 == "-N" && $2 ~ /^KUBE-/ {print c, t, $2}'
    done
  done
}

write_node_files() {
  local n=$DIR/node p=$DIR/pki c=$DIR/cmd
  mkdir -p "$n/cni/net.d" "$n/cni/ipam" "$n/kubelet" "$n/pod-logs" "$n/containerd"
  # What the machine had before: down removes only what the node added.
  local path
  for path in $NODE_HOST_PATHS; do
    if [ -e "$path" ]; then echo "$path"; fi
  done > "$n/paths-before"
  kube_chains > "$n/chains-before"
  cat > "$n/containerd.toml" <<EOF
version = 3
root = "$n/containerd/root"
state = "$n/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.blockfile", "io.containerd.snapshotter.v1.erofs", "io.containerd.nri.v1.nri"]
[grpc]
  address = "$n/containerd.sock"
[ttrpc]
  address = "$n/containerd.sock.ttrpc"
[plugins.'io.containerd.internal.v1.opt']
  path = "$n/containerd/opt"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "$PAUSE_IMAGE"
[plugins.'io.containerd.cri.v1.runtime']
  # This machine's processes may not lower oom_score_adj: without this every sandbox fails to start.
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "$(command -v runc)"
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "$n/cni/net.d"
[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
EOF
  # The bridge plugin on the cluster's own bridge; Pods get routes to the Pod and Service ranges only.
  cat > "$n/cni/net.d/10-kubequant.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "kubequant", "plugins": [
  {"type": "bridge", "bridge": "$NODE_BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$n/cni/ipam",
            "ranges": [[{"subnet": "$NODE_POD_CIDR", "gateway": "$NODE_IP", "rangeStart": "${NODE_IP%.*}.10"}]],
            "routes": [{"dst": "$SERVICE_CIDR"}]}}]}
EOF
  cat > "$n/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$p/ca.crt"}
authorization: {mode: Webhook}
containerRuntimeEndpoint: unix://$n/containerd.sock
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
podCIDR: $NODE_POD_CIDR
podLogsDir: $n/pod-logs
resolvConf: ""
# This machine's disk is shared: evict only when it is nearly full; never collect the loaded images
# (imagePullPolicy Never: a collected image could not come back).
evictionHard: {memory.available: 200Mi, nodefs.available: 2%, imagefs.available: 2%, nodefs.inodesFree: 2%}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
EOF
  cat > "$n/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: "$DIR/kube-proxy.kubeconfig"}
hostnameOverride: $NODE_NAME
bindAddress: $NODE_IP
healthzBindAddress: 127.0.0.1:$PROXY_HEALTHZ_PORT
metricsBindAddress: 127.0.0.1:$PROXY_METRICS_PORT
mode: iptables
clusterCIDR: $NODE_POD_CIDR
nodePortAddresses: ["$NODE_IP/32"]
# Leave the machine's conntrack settings as they are.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
  cat > "$c/containerd" <<EOF
export PATH="$BIN:\$PATH"
exec "$BIN/containerd" --config "$n/containerd.toml" --log-level warn
EOF
  cat > "$c/kubelet" <<EOF
exec "$BIN/kubelet" --config="$n/kubelet.yaml" --kubeconfig="$DIR/kubelet.kubeconfig" \\
  --root-dir="$n/kubelet" --cert-dir="$n/kubelet/pki" --hostname-override=$NODE_NAME --node-ip=$NODE_IP \\
  --node-labels=kubequant.io/real-node=true --v=1
EOF
  cat > "$c/kube-proxy" <<EOF
exec "$BIN/kube-proxy" --config="$n/kube-proxy.yaml" --v=1
EOF
}

node_network_up() {
  ip link add "$NODE_BRIDGE" type bridge
  ip addr add "$NODE_IP/${NODE_POD_CIDR#*/}" dev "$NODE_BRIDGE"
  ip link set "$NODE_BRIDGE" up
  # Service addresses go to the bridge, never to the machine's default route.
  ip route add "$SERVICE_CIDR" dev "$NODE_BRIDGE"
}

pause_image() {  # the sandbox image, FROM scratch with test/controlplane/pause, as an OCI archive
  local out=$DIR/node/pause.tar ctr
  ctr=$(buildah from scratch)
  buildah copy --quiet "$ctr" "$BIN/pause" /pause >/dev/null
  buildah config --entrypoint '["/pause"]' --user 65535:65535 "$ctr"
  buildah commit --quiet "$ctr" "$PAUSE_IMAGE" >/dev/null
  buildah rm "$ctr" >/dev/null
  podman save --quiet --format oci-archive -o "$out" "$PAUSE_IMAGE"
  echo "$out"
}

load_images() {  # image archives into containerd's k8s.io namespace, under the names they were saved with
  local archive
  for archive in "$@"; do
    CTR images import "$archive" >/dev/null || die "loading $archive into containerd failed"
  done
}

node_up() {
  start containerd
  wait_for containerd 30 "$BIN/ctr" --address "$(SOCK)" version
  local images=("$(pause_image)") archive
  if [ -n "${KUBEQUANT_NODE_IMAGES:-}" ]; then
    for archive in "$KUBEQUANT_NODE_IMAGES"/*.tar; do [ -e "$archive" ] && images+=("$archive"); done
  fi
  load_images "${images[@]}"
  # The apiserver's client certificate may use the kubelet's API (logs, exec, port-forward).
  K create clusterrolebinding kubequant:apiserver-kubelet --clusterrole=system:kubelet-api-admin \
    --user=kube-apiserver-kubelet-client >/dev/null
  start kubelet
  start kube-proxy
  wait_for "the real node $NODE_NAME" 90 K wait --for=condition=Ready "node/$NODE_NAME" --timeout=1s
}

node_down() {
  [ -f "$DIR/node/paths-before" ] || return 0
  stop kubelet
  stop kube-proxy
  "$BIN/kube-proxy" --cleanup >/dev/null 2>&1 || true
  if running containerd; then
    # Every Pod through the CRI: containers stopped, CNI DEL run, network namespaces and mounts gone.
    CRICTL rmp --all --force >/dev/null 2>&1 || true
  fi
  stop containerd
  pkill -f "containerd-shim-runc-v2 .*$(SOCK)" 2>/dev/null || true
  # What the kubelet and containerd mounted under the node's folder (tmpfs volumes, overlays, shm).
  unmount_under "$DIR/node"
  # The chains the kubelet and kube-proxy added, in every table: the rules jumping to them, then them.
  local added cmd table chain rule
  added=$(kube_chains | grep -vxF -f "$DIR/node/chains-before" || true)
  while read -r cmd table chain; do
    [ -n "$chain" ] || continue
    "$cmd" -t "$table" -S | awk -v c="$chain" '$1 == "-A" && $2 != c && $0 ~ ("-j " c "( |$)")' |
      while read -r rule; do eval "$cmd -t $table -D ${rule#-A }" 2>/dev/null || true; done
    "$cmd" -t "$table" -F "$chain" 2>/dev/null || true
  done <<< "$added"
  while read -r cmd table chain; do
    [ -n "$chain" ] && { "$cmd" -t "$table" -X "$chain" 2>/dev/null || true; }
  done <<< "$added"
  # The Pods' cgroups (the cgroupfs driver's kubepods tree) in every hierarchy, deepest first.
  local hierarchy tree
  for hierarchy in /sys/fs/cgroup/*/ /sys/fs/cgroup/; do
    for tree in kubepods k8s.io; do
      [ -d "$hierarchy$tree" ] && find "$hierarchy$tree" -depth -type d -exec rmdir {} \; 2>/dev/null
    done
  done
  ip link del "$NODE_BRIDGE" 2>/dev/null || true
  local path
  for path in $NODE_HOST_PATHS; do
    grep -qxF "$path" "$DIR/node/paths-before" && continue
    unmount_under "$path"  # /run/netns is a mount point of its own (and each namespace in it)
    rm -rf "$path"
  done
}

unmount_under() {  # every mount at or under a path, deepest first
  findmnt -rn -o TARGET | awk -v d="$1" '$0 == d || index($0, d "/") == 1' | sort -r | while read -r target; do
    umount -l "$target" 2>/dev/null || true
  done
}

up() {
  need_binaries
  if [ -f "$DIR/ports.env" ] && running kube-apiserver; then
    log "already up in $DIR"
    echo "export KUBECONFIG=$DIR/admin.kubeconfig"
    return 0
  fi
  if [ "$NODE" = 1 ]; then need_node; fi
  rm -rf "$DIR"
  mkdir -p "$DIR"
  {
    echo "ETCD_PORT=$(free_port)"; echo "ETCD_PEER_PORT=$(free_port)"; echo "API_PORT=$(free_port)"
    echo "CM_PORT=$(free_port)"; echo "SCHED_PORT=$(free_port)"; echo "NODE=$NODE"
    if [ "$NODE" = 1 ]; then
      echo "API_ADDRESS=$NODE_IP"; echo "KUBELET_PORT=10250"; echo "KUBELET_HEALTHZ_PORT=$(free_port)"
      echo "PROXY_HEALTHZ_PORT=$(free_port)"; echo "PROXY_METRICS_PORT=$(free_port)"
    else
      echo "API_ADDRESS=127.0.0.1"
    fi
  } > "$DIR/ports.env"
  # shellcheck source=/dev/null
  . "$DIR/ports.env"
  trap failed_up EXIT
  pki
  local users=(admin controller-manager scheduler kwok)
  if [ "$NODE" = 1 ]; then users+=(kubelet kube-proxy); fi
  for user in "${users[@]}"; do kubeconfig "$user"; done
  write_commands
  if [ "$NODE" = 1 ]; then write_node_files && node_network_up; fi
  start etcd
  wait_for etcd 30 curl -sf "http://127.0.0.1:$ETCD_PORT/health"
  start kube-apiserver
  wait_for kube-apiserver 90 apiserver_ready
  start kube-controller-manager
  start kube-scheduler
  start kwok
  K apply -f "$ROOT/test/controlplane/nodes.yaml" >/dev/null
  wait_for "the default ServiceAccount" 60 K get serviceaccount default -n default
  # Beside a real node, KWOK simulates only the GPU nodes: CPU Pods run on the real one.
  if [ "$NODE" = 1 ]; then K delete node -l 'type=kwok,!nvidia.com/gpu.count' >/dev/null; fi
  wait_for "the simulated nodes" 60 K wait --for=condition=Ready node -l type=kwok --timeout=1s
  if [ "$NODE" = 1 ]; then node_up; fi
  trap - EXIT
  log "up: Kubernetes $("$BIN/kube-apiserver" --version | awk '{print $2}') on https://$API_ADDRESS:$API_PORT, logs in $DIR/logs"
  echo "export KUBECONFIG=$DIR/admin.kubeconfig"
}

stop_all() {  # everything up started, and what the node added to the machine; the folder stays
  node_down
  for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do stop "${COMPONENTS[$i]}"; done
}

down() {
  stop_all
  rm -rf "$DIR"
  log "down"
}

failed_up() {  # an `up` that failed halfway stops what it started, and keeps its logs to read
  local status=$?
  [ "$status" -eq 0 ] && return 0
  log "up failed (exit $status): stopping what it started; logs stay in $DIR/logs"
  stop_all
  exit "$status"
}

status() {
  [ -f "$DIR/ports.env" ] || { log "not up ($DIR)"; return 1; }
  local ok=0 components=("${COMPONENTS[@]}")
  # shellcheck source=/dev/null
  . "$DIR/ports.env"
  if [ "${NODE:-0}" = 1 ]; then components+=("${NODE_COMPONENTS[@]}"); fi
  for c in "${components[@]}"; do
    if running "$c"; then echo "$c: running (pid $(cat "$DIR/pids/$c"))"; else echo "$c: stopped"; ok=1; fi
  done
  if running kube-apiserver; then K get nodes -o wide; fi
  return $ok
}

restart() {
  [ -f "$DIR/ports.env" ] || die "not up ($DIR)"
  # shellcheck source=/dev/null
  . "$DIR/ports.env"
  local name=${1:?restart needs a component: ${COMPONENTS[*]} ${NODE_COMPONENTS[*]}}
  [ -f "$DIR/cmd/$name" ] || die "unknown component $name; one of: ${COMPONENTS[*]} ${NODE_COMPONENTS[*]}"
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
