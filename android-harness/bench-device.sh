#!/usr/bin/env bash
# Run `edgemoe bench` in Termux and store the results next to the facts about the phone.
#
# Usage: bash bench-device.sh [BUNDLE] [EDGEMOE BENCH OPTIONS...]
#   BUNDLE  exported bundle (default: $EDGEMOE_BUNDLE, else ~/edgemoe-bundle)
#   further arguments go to `edgemoe bench` (for example --budgets 50%,25% --repeat 1)
#
# Writes ~/edgemoe-bench/DATE-MODEL/ with device.json (model, SoC, Android version, RAM, CPU
# cores and maximum frequencies, storage write and read speed), bench.json and bench.txt.
# Without root the page cache cannot be dropped, so `edgemoe bench` reads may hit memory; the
# storage read figure uses O_DIRECT when dd supports it and says when it could not.
set -euo pipefail

BUNDLE=${EDGEMOE_BUNDLE:-$HOME/edgemoe-bundle}
if [[ $# -gt 0 && $1 != -* ]]; then
    BUNDLE=$1
    shift
fi
[[ -f $BUNDLE/manifest.json ]] || { echo "bench-device: error: no bundle at $BUNDLE (manifest.json not found)" >&2; exit 1; }

prop() {
    getprop "$1" 2>/dev/null || true
}

model=$(prop ro.product.model)
model=${model:-unknown}
OUT=$HOME/edgemoe-bench/$(date -u +%Y%m%dT%H%M%SZ)-${model// /_}
mkdir -p "$OUT"

# Storage speed on the bundle's partition: a 256 MiB file written with fsync, then read back.
probe=$BUNDLE/../.edgemoe-dd-probe
echo "bench-device: measuring storage speed in $(dirname "$probe")"
write_line=$(dd if=/dev/zero of="$probe" bs=1M count=256 conv=fsync 2>&1 | tail -n 1)
if read_line=$(dd if="$probe" of=/dev/null bs=1M iflag=direct 2>&1 | tail -n 1); then
    read_mode="O_DIRECT"
else
    read_line=$(dd if="$probe" of=/dev/null bs=1M 2>&1 | tail -n 1)
    read_mode="buffered; may come from the page cache"
fi
rm -f "$probe"

max_freqs=$(cat /sys/devices/system/cpu/cpu*/cpufreq/cpuinfo_max_freq 2>/dev/null | tr '\n' ' ' || true)

MODEL=$model \
MANUFACTURER=$(prop ro.product.manufacturer) \
SOC=$(prop ro.soc.model) \
PLATFORM=$(prop ro.board.platform) \
ANDROID=$(prop ro.build.version.release) \
SDK=$(prop ro.build.version.sdk) \
WRITE_LINE=$write_line READ_LINE=$read_line READ_MODE=$read_mode MAX_FREQS=$max_freqs \
BUNDLE_PATH=$BUNDLE \
python3 - "$OUT/device.json" <<'EOF'
import json, os, platform, sys

def meminfo_mib(key):
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) // 1024
    return None

env = os.environ
facts = {
    "model": env["MODEL"], "manufacturer": env["MANUFACTURER"], "soc": env["SOC"],
    "board_platform": env["PLATFORM"], "android_version": env["ANDROID"], "sdk": env["SDK"],
    "kernel": platform.release(), "machine": platform.machine(),
    "cpu_cores": os.cpu_count(),
    "cpu_max_freq_khz": [int(x) for x in env["MAX_FREQS"].split()],
    "mem_total_mib": meminfo_mib("MemTotal"), "mem_available_mib": meminfo_mib("MemAvailable"),
    "storage_write_dd": env["WRITE_LINE"],
    "storage_read_dd": env["READ_LINE"], "storage_read_mode": env["READ_MODE"],
    "bundle": env["BUNDLE_PATH"], "python": platform.python_version(),
}
try:
    import edgemoe, onnxruntime
    facts["edgemoe"] = edgemoe.__version__
    facts["onnxruntime"] = onnxruntime.__version__
except ImportError as exc:
    facts["import_error"] = str(exc)
json.dump(facts, open(sys.argv[1], "w"), indent=2)
print(json.dumps(facts, indent=2))
EOF

echo "bench-device: running edgemoe bench (this takes minutes; keep the screen on or run termux-wake-lock)"
edgemoe bench "$BUNDLE" --json "$OUT/bench.json" "$@" | tee "$OUT/bench.txt"
echo "bench-device: results in $OUT"
