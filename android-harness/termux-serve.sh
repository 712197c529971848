#!/usr/bin/env bash
# Serve a bundle from Termux with an expert budget sized from the phone's available memory.
#
# Usage: bash termux-serve.sh [BUNDLE] [--lan]
#   BUNDLE  exported bundle (default: $EDGEMOE_BUNDLE, else ~/edgemoe-bundle)
#   --lan   listen on all interfaces (0.0.0.0) so other devices on the Wi-Fi network can connect;
#           needs EDGEMOE_API_KEY, which clients then send as "Authorization: Bearer KEY"
# Environment:
#   EDGEMOE_PORT           port (default 8000)
#   EDGEMOE_EXPERT_BUDGET  expert budget, overrides the computed one (300MB, 1.5GiB, 25%)
#   EDGEMOE_API_KEY        API key for every route but /health
#   BUDGET_PERCENT         share of MemAvailable given to experts (default 40)
#
# Without --lan the server listens on 127.0.0.1: only apps on the phone itself reach it.
# Android kills background apps that use too much memory, so the budget leaves most of the
# available memory to the dense weights, the KV cache and the rest of the system.
set -euo pipefail

BUNDLE=${EDGEMOE_BUNDLE:-$HOME/edgemoe-bundle}
HOST=127.0.0.1
for arg in "$@"; do
    case $arg in
        --lan) HOST=0.0.0.0 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        -*) echo "termux-serve: error: unknown option $arg (expected --lan)" >&2; exit 2 ;;
        *) BUNDLE=$arg ;;
    esac
done
PORT=${EDGEMOE_PORT:-8000}
BUDGET_PERCENT=${BUDGET_PERCENT:-40}

if [[ ! -f $BUNDLE/manifest.json ]]; then
    echo "termux-serve: error: no bundle at $BUNDLE (manifest.json not found); copy one with push-bundle.sh" >&2
    exit 1
fi
if [[ $HOST != 127.0.0.1 && -z ${EDGEMOE_API_KEY:-} ]]; then
    echo "termux-serve: error: --lan needs an API key, or anyone on the network can use the model;" >&2
    echo "  run: export EDGEMOE_API_KEY=\$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')" >&2
    exit 1
fi

if [[ -n ${EDGEMOE_EXPERT_BUDGET:-} ]]; then
    budget=$EDGEMOE_EXPERT_BUDGET
else
    available_kib=$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)
    budget=$(( available_kib * BUDGET_PERCENT / 100 / 1024 ))MiB
    echo "termux-serve: MemAvailable $(( available_kib / 1024 )) MiB; expert budget ${budget} (${BUDGET_PERCENT}%)"
fi

# A wake lock keeps the CPU running while the screen is off; termux-wake-lock comes with Termux
# itself (Termux:API is not needed).
if command -v termux-wake-lock >/dev/null; then
    termux-wake-lock
    trap 'termux-wake-unlock' EXIT
    echo "termux-serve: wake lock held until the server stops"
else
    echo "termux-serve: termux-wake-lock not found; the server may pause while the screen is off"
fi

if [[ $HOST == 0.0.0.0 ]]; then
    address=$(ip -4 addr show wlan0 2>/dev/null | awk '/inet / {sub(/\/.*/, "", $2); print $2; exit}' || true)
    echo "termux-serve: other devices connect to http://${address:-PHONE-IP}:$PORT with the API key"
fi
echo "termux-serve: serving $BUNDLE on http://$HOST:$PORT (Ctrl+C stops it)"
edgemoe serve "$BUNDLE" --host "$HOST" --port "$PORT" --expert-budget "$budget"
