#!/usr/bin/env bash
# Run edgemoe on arm64 under QEMU user-mode emulation and check it against the host.
#
# Builds (or reuses) a Debian arm64 root filesystem and installs into it the aarch64 wheels of
# the device-side dependencies and an edgemoe wheel built here. The demo model is exported on
# the host, because the arm64 tree has no onnx, as on a phone. Inside the arm64 tree the script
# then runs `edgemoe generate` and `edgemoe serve` with a POST /generate on loopback. Both must
# produce the host's greedy token ids.
#
# Needs root (debootstrap, chroot, mount) and network access to the Debian mirror and PyPI.
# Environment:
#   EDGEMOE_ARM64_CACHE  cache directory (default /var/cache/edgemoe-arm64): the root filesystem,
#                        the downloaded wheels and the host virtual environment, reused by later runs
#   EDGEMOE_ARM64_PORT   loopback port for `edgemoe serve` (default 18765)
#   DEBIAN_MIRROR        Debian mirror for debootstrap (default http://deb.debian.org/debian)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${EDGEMOE_ARM64_CACHE:-/var/cache/edgemoe-arm64}
PORT=${EDGEMOE_ARM64_PORT:-18765}
PROMPT="Once upon a time"
LOG_PREFIX=test-arm64
# shellcheck source=lib-arm64.sh
source "$REPO/android-harness/lib-arm64.sh"

if [[ $(id -u) -ne 0 ]]; then
    fail "must run as root (debootstrap, chroot and mount need it)"
fi

WORK=$(mktemp -d /tmp/edgemoe-arm64.XXXXXX)
SERVER_PID=
PROC_MOUNTED=
cleanup() {
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    if [[ -n $PROC_MOUNTED ]]; then
        umount "$ROOTFS/proc" 2>/dev/null || umount -l "$ROOTFS/proc" || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

step "installing host tools"
install_missing_tools qemu-aarch64-static:qemu-user-static update-binfmts:binfmt-support \
    debootstrap:debootstrap
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
fi
enable_qemu_binfmt

step "building the arm64 root filesystem"
ensure_arm64_rootfs

step "preparing the host environment and the edgemoe wheel"
if [[ ! -x $HOST_VENV/bin/pip ]]; then
    python3 -m venv "$HOST_VENV"
fi
"$HOST_VENV/bin/pip" install -q --disable-pip-version-check "$REPO[export]"
"$HOST_VENV/bin/pip" wheel -q --disable-pip-version-check --no-deps -w "$WORK/dist" "$REPO"

step "downloading aarch64 wheels"
mkdir -p "$WHEELS"
"$HOST_VENV/bin/pip" download -q --disable-pip-version-check --dest "$WHEELS" \
    "${AARCH64_WHEEL_TAGS[@]}" "${DEVICE_DEPS[@]}"

step "installing edgemoe into the arm64 tree"
rm -rf "$ROOTFS/opt/site" "$ROOTFS/opt/bundle"
"$HOST_VENV/bin/pip" install -q --disable-pip-version-check --no-index --target "$ROOTFS/opt/site" \
    --find-links "$WHEELS" --find-links "$WORK/dist" "${AARCH64_WHEEL_TAGS[@]}" edgemoe
# Scripts written by `pip install --target` point at the host's Python, so the arm64 tree gets
# its own launcher.
cat > "$ROOTFS/usr/local/bin/edgemoe" <<'EOF'
#!/bin/sh
exec python3 -m edgemoe "$@"
EOF
chmod 755 "$ROOTFS/usr/local/bin/edgemoe"

step "exporting the demo model on the host"
"$HOST_VENV/bin/edgemoe" export "$REPO/runtime/demo/tinystories-moe-8x" "$WORK/bundle"
cp -a "$WORK/bundle" "$ROOTFS/opt/bundle"
"$HOST_VENV/bin/edgemoe" generate "$WORK/bundle" --prompt "$PROMPT" --expert-budget 25% \
    --temperature 0 --max-tokens 16 --json > "$WORK/host.json"

# The chroot gets no sysfs, only a stand-in cpu folder (see write_fake_cpu_dir).
if mountpoint -q "$ROOTFS/sys"; then
    fail "$ROOTFS/sys is a mount point; unmount it (onnxruntime crashes with the host's sysfs)"
fi
write_fake_cpu_dir "$ROOTFS/sys/devices/system/cpu"
mount -t proc proc "$ROOTFS/proc"
PROC_MOUNTED=1

in_arm64() {
    chroot "$ROOTFS" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root \
        PYTHONPATH=/opt/site EDGEMOE_CACHE_DIR=/tmp/edgemoe-cache "$@"
}

step "checking the emulated architecture and versions"
in_arm64 python3 -c '
import platform, numpy, onnxruntime, tokenizers, pydantic, fastapi
assert platform.machine() == "aarch64", platform.machine()
print("machine", platform.machine(), "python", platform.python_version(), "onnxruntime",
      onnxruntime.__version__, "numpy", numpy.__version__, "tokenizers", tokenizers.__version__)
'

step "running edgemoe generate under emulation"
in_arm64 edgemoe generate /opt/bundle --prompt "$PROMPT" --expert-budget 25% --temperature 0 \
    --max-tokens 16 --json > "$WORK/arm64.json"
python3 - "$WORK/host.json" "$WORK/arm64.json" <<'EOF'
import json, sys
host = json.load(open(sys.argv[1]))
arm64 = json.load(open(sys.argv[2]))
print("host  ids", host["token_ids"])
print("arm64 ids", arm64["token_ids"])
print("arm64 stats", json.dumps(arm64["stats"]))
if host["token_ids"] != arm64["token_ids"]:
    sys.exit("test-arm64: FAILED: edgemoe generate on arm64 returned other greedy token ids than the host")
EOF

step "running edgemoe serve under emulation"
# exec makes $! the server's own PID (chroot, env and the launcher all exec), so cleanup stops
# the server and not only a subshell.
(exec chroot "$ROOTFS" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root \
    PYTHONPATH=/opt/site EDGEMOE_CACHE_DIR=/tmp/edgemoe-cache \
    edgemoe serve /opt/bundle --host 127.0.0.1 --port "$PORT" --expert-budget 25%) \
    > "$WORK/serve.log" 2>&1 &
SERVER_PID=$!
# The chroot shares the host's network namespace, so the host reaches the server on loopback.
if ! python3 - "$PORT" "$PROMPT" "$WORK/host.json" "$SERVER_PID" <<'EOF'
import json, os, sys, time, urllib.error, urllib.request
port, prompt, host_json, pid = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
base = f"http://127.0.0.1:{port}"
deadline = time.monotonic() + 600
while True:
    try:
        with urllib.request.urlopen(base + "/health", timeout=10) as response:
            if response.status == 200:
                break
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("test-arm64: FAILED: edgemoe serve exited before /health returned 200")
    if time.monotonic() > deadline:
        sys.exit("test-arm64: FAILED: /health did not return 200 within 600 s")
    time.sleep(1)
body = json.dumps({"prompt": prompt, "max_tokens": 16, "temperature": 0}).encode()
request = urllib.request.Request(base + "/generate", data=body,
                                 headers={"content-type": "application/json"})
with urllib.request.urlopen(request, timeout=600) as response:
    served = json.load(response)
expected = json.load(open(host_json))["token_ids"]
print("serve ids", served["token_ids"])
if served["token_ids"] != expected:
    sys.exit("test-arm64: FAILED: /generate on arm64 returned other greedy token ids than the host")
EOF
then
    echo "test-arm64: server log:" >&2
    cat "$WORK/serve.log" >&2
    exit 1
fi
kill "$SERVER_PID"
wait "$SERVER_PID" 2>/dev/null || true
SERVER_PID=

step "done"
echo "test-arm64: passed in $SECONDS s"
