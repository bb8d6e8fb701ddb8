#!/usr/bin/env bash
# Installs the command-line tools the deployment checks need, when missing:
#   promtool + prometheus  Debian's `prometheus` package (its service is not started)
#   helm                   built with `go install` through the Go module proxy into the tools cache
# Idempotent: a tool already present is left alone. Called by .ci/run before the test suite.
set -euo pipefail

HELM_VERSION="${HELM_VERSION:-v3.17.3}"
TOOLS_BIN="${DATAPROC_TOOLS_BIN:-${XDG_CACHE_HOME:-$HOME/.cache}/dataproc-tools/bin}"
mkdir -p "$TOOLS_BIN"

log() { printf 'install-tools: %s\n' "$*" >&2; }

if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
    log "installing Debian's prometheus package (promtool, prometheus)"
    # Keep the package's service from starting: the tests start their own Prometheus when they need one.
    policy_rc=/usr/sbin/policy-rc.d
    created_policy=0
    if [ ! -e "$policy_rc" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy_rc" && chmod +x "$policy_rc" && created_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends prometheus >/dev/null \
        || { apt-get update >/dev/null && apt-get install -y --no-install-recommends prometheus >/dev/null; }
    if [ "$created_policy" = 1 ]; then rm -f "$policy_rc"; fi
fi
log "$(promtool --version 2>&1 | head -n1)"

if ! command -v helm >/dev/null && [ ! -x "$TOOLS_BIN/helm" ]; then
    command -v go >/dev/null || { log "go is needed to build helm"; exit 1; }
    log "building helm $HELM_VERSION with go install (a few minutes on 2 cores)"
    GOBIN="$TOOLS_BIN" GOFLAGS=-mod=mod go install "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}"
fi
helm_bin="$(command -v helm || echo "$TOOLS_BIN/helm")"
log "helm: $("$helm_bin" version --short 2>&1) at $helm_bin"
