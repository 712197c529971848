#!/usr/bin/env bash
# Copy an exported bundle from this computer to an Android phone over adb, for use in Termux.
#
# Usage: push-bundle.sh BUNDLE [NAME]
#   BUNDLE  bundle directory written by `edgemoe export` (it contains manifest.json)
#   NAME    directory name on the phone (default: the bundle's directory name)
#
# adb cannot write into Termux's home (/data/data/com.termux/files/home): it belongs to the
# Termux app, and `adb shell` runs as another user. So the bundle goes to shared storage
# (/sdcard/Download/NAME) and Termux copies it into its home, as the script prints at the end.
# Run the bundle from the Termux home, not from shared storage: shared storage goes through a
# FUSE layer that makes the small random reads of expert loading several times slower.
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,12p' "$0"
    exit 2
fi
BUNDLE=${1%/}
NAME=${2:-$(basename "$BUNDLE")}
REMOTE=/sdcard/Download/$NAME

fail() {
    echo "push-bundle: error: $*" >&2
    exit 1
}

[[ -f $BUNDLE/manifest.json ]] || fail "$BUNDLE is not a bundle (manifest.json not found); create one with edgemoe export"
command -v adb >/dev/null || fail "adb not found; install Android platform-tools (Debian: apt install adb)"
state=$(adb get-state 2>/dev/null || true)
if [[ $state != device ]]; then
    fail "no phone ready over adb (state: ${state:-none}); enable USB debugging and accept the prompt on the phone"
fi

size_kib=$(du -sk "$BUNDLE" | cut -f1)
free_kib=$(adb shell df -k /sdcard | awk 'NR == 2 {print $4}' | tr -d '\r' || true)
if [[ -n $free_kib && $free_kib =~ ^[0-9]+$ ]]; then
    # The copy into the Termux home needs the same space again on the same partition.
    if (( free_kib < 2 * size_kib )); then
        fail "the phone has $(( free_kib / 1024 )) MiB free and needs $(( 2 * size_kib / 1024 )) MiB (the bundle twice)"
    fi
fi

echo "push-bundle: copying $BUNDLE ($(( size_kib / 1024 )) MiB) to $REMOTE"
adb shell rm -rf "$REMOTE"
adb push "$BUNDLE" "$REMOTE"

cat <<EOF
push-bundle: done. In Termux, run once: termux-setup-storage   (and allow access to files)
then copy the bundle into the Termux home (replacing an older one) and remove the shared copy:
  rm -rf ~/edgemoe-bundle && cp -r ~/storage/downloads/$NAME ~/edgemoe-bundle && rm -rf ~/storage/downloads/$NAME
  edgemoe generate ~/edgemoe-bundle --prompt "Once upon a time"
EOF
