#!/usr/bin/env bash
# Builds the CPU image from this checkout and runs COMMAND next to it, then tears down what it started:
#   bash scripts/docker-local.sh [COMMAND...]    e.g. .venv/bin/python -m pytest -q -m docker
# COMMAND sees DOCKER_HOST and TABLEFREE_DOCKER_IMAGE (the tag built).
#
# Where a Docker engine answers (`docker info`), it is used and the real base image is pulled.
# Otherwise (as root) a private engine is brought up from Debian's packages, nothing installed
# system-wide (see ../shared/notes/docker-here.md): apt-get download + dpkg -x; dockerd with its
# own data root and socket, no bridge (containers use --network host); the base image made with
# mmdebstrap from the Debian suite of its tag; pip's local torch wheel (find-links) served to the
# build as a one-file package index on 127.0.0.1; the machine's extra CA certificates passed as a
# build argument. On every exit path: its containers and volumes removed, the index server and
# dockerd stopped by PID, anything still mounted under its scratch directory lazily unmounted,
# the scratch directory (data root included) removed.
#   TABLEFREE_DOCKER_IMAGE  tag to build (default tablefree:cpu)
#   TABLEFREE_DOCKER_DATA   keep the private engine's data root here (images, layer cache) across runs
set -euo pipefail
cd "$(dirname "$0")/.."
DOCKERFILE=docker/Dockerfile.cpu
export TABLEFREE_DOCKER_IMAGE=${TABLEFREE_DOCKER_IMAGE:-tablefree:cpu}
# Containers and volumes COMMAND makes carry this label (tests/test_docker_run.py), so that they go too.
export TABLEFREE_DOCKER_LABEL=tablefree-run-$$
BASE_IMAGE=$(sed -n 's/^ARG BASE_IMAGE=//p' "$DOCKERFILE")
SCRATCH="" DOCKERD_PID="" INDEX_PID="" CHILD=""
build_args=()
set -m  # jobs in their own process groups, where SIGINT is not ignored (see interruptible)

log() { echo "docker-local: $*" >&2; }

interruptible() {  # bash runs no trap while a foreground command runs: wait on a background one instead
    "$@" &
    CHILD=$!
    wait "$CHILD"
    CHILD=""
}

teardown() {
    local status=$? pid
    set +e
    if [ -n "$CHILD" ]; then  # interrupted: SIGINT first, on which pytest runs its own cleanup
        for signal in INT TERM KILL; do
            kill "-$signal" -- "-$CHILD" 2>/dev/null || break
            for _ in $(seq 40); do kill -0 "$CHILD" 2>/dev/null || break 2; sleep 0.5; done
        done
    fi
    if docker info >/dev/null 2>&1; then
        docker ps -aq --filter "label=$TABLEFREE_DOCKER_LABEL" | xargs -r docker rm -f >/dev/null
        docker volume ls -q --filter "label=$TABLEFREE_DOCKER_LABEL" | xargs -r docker volume rm >/dev/null
    fi
    if [ -n "$DOCKERD_PID" ]; then
        docker ps -aq | xargs -r docker rm -f >/dev/null  # the private engine's containers are all ours
        kill "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
        kill -9 "$DOCKERD_PID" 2>/dev/null
        wait "$DOCKERD_PID" 2>/dev/null
        # the containerd dockerd started outlives a dockerd that had to be killed (a stale pid file names another)
        pid=$(cat "$SCRATCH/e/containerd/containerd.pid" 2>/dev/null)
        [ -n "$pid" ] && grep -qF "$SCRATCH" "/proc/$pid/cmdline" 2>/dev/null && kill "$pid"
    fi
    [ -n "$INDEX_PID" ] && kill "$INDEX_PID" 2>/dev/null && wait "$INDEX_PID" 2>/dev/null
    if [ -n "$SCRATCH" ]; then
        # deepest first; /proc/self/mounts writes a space in a path as \040 (there is none in ours)
        awk -v dir="$SCRATCH" 'index($2, dir) == 1 {print $2}' /proc/self/mounts | sort -r | xargs -r -n1 umount -l
        if [ -n "${TABLEFREE_DOCKER_DATA:-}" ]; then
            awk -v dir="$TABLEFREE_DOCKER_DATA" 'index($2, dir) == 1 {print $2}' /proc/self/mounts | sort -r \
                | xargs -r -n1 umount -l
        fi
        rm -rf "$SCRATCH"
    fi
    exit "$status"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

start_private_engine() {
    [ "$(id -u)" = 0 ] || { log "no Docker engine answers, and a private one needs root"; exit 1; }
    # short: dockerd's and containerd's unix sockets live under it (~100 characters at most)
    SCRATCH=$(mktemp -d /tmp/tfd.XXXXXX)
    mkdir -p "$SCRATCH/debs" "$SCRATCH/root" "$SCRATCH/e" "$SCRATCH/tmp"
    local packages=(docker.io containerd runc mmdebstrap)
    (cd "$SCRATCH/debs" && { apt-get download "${packages[@]}" >/dev/null 2>&1 \
        || { apt-get update >/dev/null && apt-get download "${packages[@]}" >/dev/null; }; })
    for deb in "$SCRATCH"/debs/*.deb; do dpkg -x "$deb" "$SCRATCH/root"; done
    export PATH="$SCRATCH/root/usr/bin:$SCRATCH/root/usr/sbin:$PATH"
    local data=${TABLEFREE_DOCKER_DATA:-$SCRATCH/data}
    mkdir -p "$data"
    dockerd --data-root "$data" --exec-root "$SCRATCH/e" --pidfile "$SCRATCH/e/dockerd.pid" \
        -H "unix://$SCRATCH/e/docker.sock" --storage-driver overlay2 --iptables=false --ip-masq=false \
        --bridge=none --userland-proxy=false >"$SCRATCH/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    export DOCKER_HOST="unix://$SCRATCH/e/docker.sock"
    for _ in $(seq 120); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || { tail -20 "$SCRATCH/dockerd.log" >&2; log "dockerd did not start"; exit 1; }
    log "private engine up (dockerd $DOCKERD_PID, $DOCKER_HOST, data root $data)"
}

debian_mirror() {  # the Debian mirror this machine's apt uses, e.g. http://deb.debian.org/debian
    apt-get indextargets --format '$(SITE) $(RELEASE)' 'Identifier: Packages' 2>/dev/null \
        | awk '$2 !~ /security/ {print $1; exit}'
}

make_base_image() {  # BASE_IMAGE from a Debian rootfs of its suite (python:3.11.7-slim-bookworm: bookworm),
    # with what the official image has: python3 with venv and its C headers, CA certificates
    local suite=${BASE_IMAGE##*-} mirror
    mirror=$(debian_mirror)
    log "making $BASE_IMAGE with mmdebstrap ($suite from ${mirror:-the default mirror})"
    TMPDIR=$SCRATCH/tmp mmdebstrap --quiet --variant=minbase \
        --include=ca-certificates,python3,python3-venv,python3-dev,python-is-python3 \
        "$suite" "$SCRATCH/rootfs.tar" ${mirror:+"deb $mirror $suite main" "deb $mirror $suite-updates main"}
    docker import -c 'ENV LANG=C.UTF-8' "$SCRATCH/rootfs.tar" "$BASE_IMAGE" >/dev/null
    rm "$SCRATCH/rootfs.tar"
}

serve_local_torch() {  # pip's local torch wheels (find-links) as a one-file PEP 503 index on 127.0.0.1
    local dirs dir wheel name port
    dirs=$(python3 -m pip config list 2>/dev/null | sed -n "s/^[^=]*find-links='\(.*\)'$/\1/p" | tr ' ' '\n' | sort -u)
    mkdir -p "$SCRATCH/index/simple/torch"
    for dir in $dirs; do
        for wheel in "$dir"/torch-*.whl; do
            [ -f "$wheel" ] || continue
            name=$(basename "$wheel")
            ln -sf "$wheel" "$SCRATCH/index/simple/torch/$name"
            echo "<a href=\"${name//+/%2B}#sha256=$(sha256sum "$wheel" | cut -d' ' -f1)\">$name</a>"
        done
    done >"$SCRATCH/index/simple/torch/index.html"
    [ -s "$SCRATCH/index/simple/torch/index.html" ] || { log "no local torch wheel: PyTorch's index is used"; return; }
    port=$(free_port)
    python3 -m http.server "$port" --bind 127.0.0.1 --directory "$SCRATCH/index" >/dev/null 2>&1 &
    INDEX_PID=$!
    build_args+=(--build-arg "TORCH_INDEX=http://127.0.0.1:$port/simple")
    log "torch from $(grep -c . "$SCRATCH/index/simple/torch/index.html") local wheel(s) on 127.0.0.1:$port"
}

if docker info >/dev/null 2>&1; then
    log "using the running Docker engine"
    docker pull "$BASE_IMAGE"
else
    start_private_engine
    docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 || make_base_image
    serve_local_torch
    extra_ca=$(cat /usr/local/share/ca-certificates/*.crt 2>/dev/null || true)
    [ -z "$extra_ca" ] || build_args+=(--build-arg "EXTRA_CA_CERTS=$extra_ca")
    build_args+=(--network host)  # no bridge: the build reaches the index and the mirrors as the host does
fi
started=$SECONDS
interruptible docker build "${build_args[@]}" -f "$DOCKERFILE" -t "$TABLEFREE_DOCKER_IMAGE" .
log "built $TABLEFREE_DOCKER_IMAGE in $((SECONDS - started)) s"
if [ $# -gt 0 ]; then
    interruptible "$@"
fi
