# Shared steps of test-arm64.sh and test-docker-arm64.sh; source it from bash as root.
#
# Expects CACHE (cache directory) to be set. Provides the paths below, among them ROOTFS, the
# cached Debian arm64 root filesystem, and the functions after them.

ROOTFS=$CACHE/rootfs
ROOTFS_MARKER=$ROOTFS/.edgemoe-rootfs-complete
DEBIAN_SUITE=bookworm     # Python 3.11, matching the aarch64 wheel tags the tests download
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WHEELS=$CACHE/wheels      # aarch64 wheels downloaded on the host
HOST_VENV=$CACHE/host-venv  # host environment with edgemoe[export], for exports and reference runs
DEVICE_DEPS=(onnxruntime numpy tokenizers fastapi uvicorn pydantic pydantic-settings jinja2
             prometheus-client tqdm)
# pip options that select CPython 3.11 aarch64 wheels while pip itself runs on the host.
AARCH64_WHEEL_TAGS=(--only-binary=:all: --python-version 3.11 --implementation cp --abi cp311
                    --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64
                    --platform manylinux_2_27_aarch64 --platform manylinux_2_28_aarch64)

# Install the Debian packages that provide the given commands, for those not on PATH.
# Arguments are command:package pairs.
install_missing_tools() {
    local pair missing=()
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
    done
    if [[ ${#missing[@]} -gt 0 ]]; then
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
    fi
}

# Register qemu-aarch64-static for aarch64 binaries. Debian's qemu-user-static registers it with
# the F flag, so the interpreter is found inside chroots and containers too.
enable_qemu_binfmt() {
    if ! mountpoint -q /proc/sys/fs/binfmt_misc; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    fi
    update-binfmts --enable qemu-aarch64 2>/dev/null || true
    if ! grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null; then
        echo "the qemu-aarch64 binfmt handler is not registered; check update-binfmts --display qemu-aarch64" >&2
        return 1
    fi
}

# Build the arm64 root filesystem unless a complete one is cached.
ensure_arm64_rootfs() {
    mkdir -p "$CACHE"
    if [[ -f $ROOTFS_MARKER ]]; then
        echo "reusing $ROOTFS"
        return 0
    fi
    # debootstrap writes into a temporary directory so an interrupted run is never reused.
    rm -rf "$ROOTFS.partial"
    debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip \
        "$DEBIAN_SUITE" "$ROOTFS.partial" "$DEBIAN_MIRROR"
    date -u +%Y%m%dT%H%M%SZ > "$ROOTFS.partial/.edgemoe-rootfs-complete"
    rm -rf "$ROOTFS"
    mv "$ROOTFS.partial" "$ROOTFS"
}

# Write a stand-in for /sys/devices/system/cpu into the given directory.
#
# onnxruntime's aarch64 wheels from 1.28 on read CPU cache sizes from
# /sys/devices/system/cpu/cpuN/cache. Under qemu-user those are the x86 host's values, and the
# import crashes with a segmentation fault (in Docker it shows as a hang). The stand-in lists
# two CPUs and has no cache entries, so onnxruntime falls back to its defaults.
write_fake_cpu_dir() {
    mkdir -p "$1"
    echo 0-1 > "$1/possible"
    echo 0-1 > "$1/present"
}

# Progress and failure lines, prefixed with the calling script's LOG_PREFIX.
step_started=$SECONDS
step() {
    local now=$SECONDS
    if [[ -n ${step_name:-} ]]; then
        echo "${LOG_PREFIX}: ${step_name} took $((now - step_started)) s"
    fi
    step_name=$1
    step_started=$now
    echo "${LOG_PREFIX}: ${step_name}"
}

fail() {
    echo "${LOG_PREFIX}: FAILED: $*" >&2
    exit 1
}
