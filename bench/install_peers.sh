#!/usr/bin/env bash
# Install what bench/peer_wheels.sh fetched into SITE, offline, beside the machine's own torch:
#   bash bench/install_peers.sh DEST SITE && export PEERS_SITE=SITE
# Wheels are unpacked as they are; the sdists are built here with this machine's Python and compiler.
set -euo pipefail
dest=${1:?usage: install_peers.sh DEST SITE}
site=${2:?usage: install_peers.sh DEST SITE}
python=${PYTHON:-python3}
mkdir -p "$site"
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$dest"/*.whl
for sdist in "$dest"/*.tar.gz; do
  "$python" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$site" "$sdist" \
    || echo "install_peers: $(basename "$sdist") did not build here (see above); the peer that needs it is skipped" >&2
done
