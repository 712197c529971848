#!/usr/bin/env bash
# Install edgemoe in Termux on Android, then run a smoke test.
#
# Usage: bash termux-install.sh [SOURCE] [BUNDLE]
#   SOURCE  edgemoe checkout or wheel file (default: the checkout that contains this script)
#   BUNDLE  exported bundle for the smoke test (default: $EDGEMOE_BUNDLE, else ~/edgemoe-bundle)
#
# The compiled dependencies come from Termux packages, because PyPI has no wheels for Android
# and `pip install onnxruntime` fails in Termux: numpy, onnxruntime and pydantic-core from the
# main repository, tokenizers from the Termux User Repository (tur-repo). pip installs only the
# pure-Python rest, with --only-binary=:all: and those four pinned to the installed versions, so
# it never builds or replaces them. Running the script again is safe: pkg and pip skip what is
# already installed.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
SOURCE=${1:-$HERE/..}
BUNDLE=${2:-${EDGEMOE_BUNDLE:-$HOME/edgemoe-bundle}}
PROMPT="Once upon a time"
# Distribution names of the packages that must come from pkg, never from pip.
PKG_PROVIDED=(numpy onnxruntime pydantic-core tokenizers)
# The pure-Python dependencies from pyproject.toml; pydantic's version follows pydantic-core.
PIP_PACKAGES=(fastapi uvicorn pydantic pydantic-settings jinja2 prometheus-client tqdm)

say() {
    echo "termux-install: $*"
}

fail() {
    echo "termux-install: error: $*" >&2
    exit 1
}

installed_version() {
    python3 -c 'import sys, importlib.metadata as m; print(m.version(sys.argv[1]))' "$1" 2>/dev/null
}

if [[ -z ${TERMUX_VERSION:-} && ${PREFIX:-} != */com.termux/* ]]; then
    fail "this script is for Termux on Android (TERMUX_VERSION is not set); elsewhere run pip install ."
fi
if [[ ! -e $SOURCE ]]; then
    fail "edgemoe source not found at $SOURCE; pass a checkout or a wheel file as the first argument"
fi

pkg_install() {
    if ! pkg install -y "$@"; then
        fail "pkg could not install $*; run 'pkg update' and try again, pick another mirror with \
termux-change-repo if it keeps failing, and use Termux from F-Droid or GitHub (the Play Store build \
is outdated)"
    fi
}

say "installing Python, numpy, onnxruntime and pydantic-core with pkg"
pkg_install python python-pip python-numpy python-onnxruntime python-pydantic-core

say "installing tokenizers from the Termux User Repository (tur-repo)"
pkg_install tur-repo
# The repository added by tur-repo is only searched after its package list is fetched.
pkg update -y || true
pkg_install python-tokenizers

declare -A pinned
for name in "${PKG_PROVIDED[@]}"; do
    version=$(installed_version "$name") || fail "$name is not importable after pkg install; run pkg install again and check its output"
    pinned[$name]=$version
    say "$name $version (from pkg)"
done

# A constraints file pins the pkg-provided packages: pip picks the pydantic release that requires
# exactly the installed pydantic-core, and fails instead of replacing any of the four.
constraints=$(mktemp "${TMPDIR:-/tmp}/edgemoe-constraints.XXXXXX")
trap 'rm -f "$constraints"' EXIT
for name in "${PKG_PROVIDED[@]}"; do
    echo "$name==${pinned[$name]}" >> "$constraints"
done

say "installing the pure-Python dependencies with pip: ${PIP_PACKAGES[*]}"
# MarkupSafe (needed by jinja2) publishes no wheel that Termux's Python can use; its source
# distribution falls back to pure Python when no C compiler is present.
# NOTE: not verified on a phone; if it fails, pkg install clang and run this script again.
if ! python3 -m pip install --only-binary=:all: --no-binary=markupsafe --upgrade-strategy only-if-needed \
        -c "$constraints" "${PIP_PACKAGES[@]}"; then
    fail "pip could not install the pure-Python dependencies with pydantic-core ${pinned[pydantic-core]}; \
if no pydantic release requires that version, update Termux packages (pkg upgrade) and run this script again"
fi

say "installing edgemoe from $SOURCE (without dependencies)"
python3 -m pip install --no-deps --force-reinstall "$SOURCE"

for name in "${PKG_PROVIDED[@]}"; do
    now=$(installed_version "$name") || now=missing
    if [[ $now != "${pinned[$name]}" ]]; then
        fail "$name changed from ${pinned[$name]} to $now during the pip steps; reinstall it with pkg install --reinstall"
    fi
done

say "smoke test"
python3 -c '
import platform, fastapi, numpy, onnxruntime, pydantic, pydantic_core, tokenizers, uvicorn
import edgemoe
print("python", platform.python_version(), platform.machine())
for module in (edgemoe, onnxruntime, numpy, tokenizers, pydantic, pydantic_core, fastapi, uvicorn):
    print(f"  {module.__name__} {module.__version__}")
'
if [[ -f $BUNDLE/manifest.json ]]; then
    edgemoe generate "$BUNDLE" --prompt "$PROMPT" --temperature 0 --max-tokens 16 --expert-budget 25%
    say "done: edgemoe generated text from $BUNDLE"
else
    say "done, but no bundle at $BUNDLE, so generation was not tried."
    say "Export one on a computer and copy it here with push-bundle.sh (see README.md), then run:"
    say "  edgemoe generate $BUNDLE --prompt \"$PROMPT\""
fi
