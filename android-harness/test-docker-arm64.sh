#!/usr/bin/env bash
# Build the Dockerfile for arm64 and run it under QEMU emulation on this machine.
#
# Starts a private dockerd (its own socket, no iptables, no bridge) and imports the cached
# Debian arm64 root filesystem of test-arm64.sh as the base image. After the build, the
# container runs with host networking and the server bound to 127.0.0.1. The script waits for
# the HEALTHCHECK to report healthy and checks that POST /generate returns the host's greedy
# token ids. It stops the container and dockerd on exit.
#
# Needs root and network access to the Debian mirror and PyPI.
# Environment:
#   EDGEMOE_ARM64_CACHE  cache directory shared with test-arm64.sh (default /var/cache/edgemoe-arm64);
#                        also holds dockerd's data, so later builds reuse their layers
#   EDGEMOE_DOCKER_PORT  loopback port of the server (default 18767)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${EDGEMOE_ARM64_CACHE:-/var/cache/edgemoe-arm64}
PORT=${EDGEMOE_DOCKER_PORT:-18767}
BASE_IMAGE=local/debian-arm64
IMAGE=local/edgemoe:arm64-test
PROMPT="Once upon a time"
LOG_PREFIX=test-docker-arm64
# shellcheck source=lib-arm64.sh
source "$REPO/android-harness/lib-arm64.sh"

if [[ $(id -u) -ne 0 ]]; then
    fail "must run as root (dockerd, debootstrap and mount need it)"
fi

WORK=$(mktemp -d /tmp/edgemoe-docker.XXXXXX)
SOCKET=$WORK/docker.sock
CONTAINER=edgemoe-arm64-test-$$
DOCKERD_PID=
docker_cli() {
    # /usr/bin/docker is the client of the docker.io package, the same version as its dockerd.
    /usr/bin/docker -H "unix://$SOCKET" "$@"
}
cleanup() {
    if [[ -n $DOCKERD_PID ]]; then
        docker_cli rm -f "$CONTAINER" >/dev/null 2>&1 || true
        kill "$DOCKERD_PID" 2>/dev/null || true
        wait "$DOCKERD_PID" 2>/dev/null || true
    fi
    # dockerd can leave its network namespace mounted under the exec root.
    local mount_point
    for mount_point in $(awk -v work="$WORK/" 'index($2, work) == 1 {print $2}' /proc/mounts | sort -r); do
        umount "$mount_point" 2>/dev/null || umount -l "$mount_point" || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

step "installing host tools"
install_missing_tools qemu-aarch64-static:qemu-user-static update-binfmts:binfmt-support \
    debootstrap:debootstrap dockerd:docker.io
if [[ ! -x /usr/bin/docker ]]; then
    fail "/usr/bin/docker is missing; install the docker.io package"
fi
enable_qemu_binfmt

step "building the arm64 root filesystem"
ensure_arm64_rootfs

step "starting dockerd"
dockerd --iptables=false --bridge=none --data-root "$CACHE/docker" --exec-root "$WORK/exec" \
    --pidfile "$WORK/dockerd.pid" --host "unix://$SOCKET" > "$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
for _ in $(seq 60); do
    if docker_cli version >/dev/null 2>&1; then
        break
    fi
    if ! kill -0 "$DOCKERD_PID" 2>/dev/null; then
        cat "$WORK/dockerd.log" >&2
        fail "dockerd exited during start-up"
    fi
    sleep 1
done
docker_cli version --format 'dockerd {{.Server.Version}}' || fail "dockerd did not answer within 60 s"

step "importing the root filesystem as $BASE_IMAGE"
rootfs_stamp=$(stat -c %Y "$ROOTFS_MARKER")
current_stamp=$(docker_cli image inspect --format '{{index .Config.Labels "edgemoe.rootfs"}}' \
    "$BASE_IMAGE" 2>/dev/null || true)
if [[ $current_stamp == "$rootfs_stamp" ]]; then
    echo "reusing $BASE_IMAGE"
else
    # The files test-arm64.sh adds (site packages, bundle, launcher, fake /sys) stay out.
    tar -C "$ROOTFS" --exclude=./proc/* --exclude=./sys/* --exclude=./opt/site \
        --exclude=./opt/bundle --exclude=./usr/local/bin/edgemoe -c . \
        | docker_cli import --platform linux/arm64 --change "LABEL edgemoe.rootfs=$rootfs_stamp" \
            --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE"
fi

step "downloading aarch64 wheels for the build"
# The build installs from wheels downloaded here rather than from PyPI: pip inside the
# emulated build is slow, and it would not trust a TLS proxy that only the host trusts.
if [[ ! -x $HOST_VENV/bin/pip ]]; then
    python3 -m venv "$HOST_VENV"
fi
"$HOST_VENV/bin/pip" install -q --disable-pip-version-check "$REPO[export]"
mkdir -p "$WHEELS"
"$HOST_VENV/bin/pip" download -q --disable-pip-version-check --dest "$WHEELS" \
    "${AARCH64_WHEEL_TAGS[@]}" "${DEVICE_DEPS[@]}" onnx setuptools

step "building $IMAGE"
context=$WORK/context
mkdir -p "$context"
cp -a "$REPO/Dockerfile" "$REPO/.dockerignore" "$REPO/pyproject.toml" "$REPO/README.md" \
    "$REPO/edgemoe" "$REPO/export" "$REPO/runtime" "$REPO/server" "$context/"
cp -a "$WHEELS" "$context/wheelhouse"
docker_cli build -q --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    --build-arg "PIP_OPTIONS=--no-index --find-links /src/wheelhouse" -t "$IMAGE" "$context"
# Earlier builds of the tag are left untagged in the cached data root; this removes them.
docker_cli image prune -f > /dev/null
# The classic builder of docker.io 20.10 records the daemon's architecture (amd64) in the image.
# So the check of what really runs is `uname -m` in the container below.

step "computing the host's greedy token ids"
EDGEMOE_CACHE_DIR=$WORK/host-cache "$HOST_VENV/bin/edgemoe" generate --prompt "$PROMPT" \
    --expert-budget 25% --temperature 0 --max-tokens 16 --json > "$WORK/host.json"

step "running the container under emulation"
write_fake_cpu_dir "$WORK/fake-cpu"
# Host networking with EDGEMOE_HOST=127.0.0.1 keeps the server on loopback; the daemon has no
# bridge. The fake cpu folder replaces the host's (see write_fake_cpu_dir).
docker_cli run -d --name "$CONTAINER" --network host \
    -v "$WORK/fake-cpu:/sys/devices/system/cpu:ro" \
    -e EDGEMOE_HOST=127.0.0.1 -e "EDGEMOE_PORT=$PORT" -e EDGEMOE_EXPERT_BUDGET=25% \
    --health-interval 5s --health-start-period 600s "$IMAGE" > /dev/null
machine=$(docker_cli exec "$CONTAINER" uname -m)
if [[ $machine != aarch64 ]]; then
    fail "the container runs on $machine, expected aarch64"
fi
health=starting
for _ in $(seq 300); do
    health=$(docker_cli inspect --format '{{.State.Health.Status}}' "$CONTAINER" 2>/dev/null || echo exited)
    if [[ $health == healthy || $(docker_cli inspect --format '{{.State.Running}}' "$CONTAINER") != true ]]; then
        break
    fi
    sleep 2
done
if [[ $health != healthy ]]; then
    docker_cli logs "$CONTAINER" >&2 || true
    fail "the container's health is $health, expected healthy"
fi

step "requesting /health and /generate"
if ! python3 - "$PORT" "$PROMPT" "$WORK/host.json" <<'EOF'
import json, sys, urllib.request
port, prompt, host_json = sys.argv[1], sys.argv[2], sys.argv[3]
base = f"http://127.0.0.1:{port}"
with urllib.request.urlopen(base + "/health", timeout=30) as response:
    print("health", response.status, response.read().decode())
body = json.dumps({"prompt": prompt, "max_tokens": 16, "temperature": 0}).encode()
request = urllib.request.Request(base + "/generate", data=body,
                                 headers={"content-type": "application/json"})
with urllib.request.urlopen(request, timeout=600) as response:
    served = json.load(response)
expected = json.load(open(host_json))["token_ids"]
print("host      ids", expected)
print("container ids", served["token_ids"])
print("timings", json.dumps(served.get("timings")))
if served["token_ids"] != expected:
    sys.exit("test-docker-arm64: FAILED: /generate in the arm64 container returned other greedy token ids than the host")
EOF
then
    docker_cli logs "$CONTAINER" >&2 || true
    exit 1
fi
user=$(docker_cli exec "$CONTAINER" id -un)
if [[ $user != edgemoe ]]; then
    fail "the server runs as $user, expected the non-root user edgemoe"
fi

step "done"
echo "test-docker-arm64: passed in $SECONDS s"
