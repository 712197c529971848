"""`edgemoe bench`: decode speed, time to first token and expert-cache behaviour per mode and
expert budget, measured side by side in one run.

Modes follow the EdgeMoE paper's baselines: `all-in-ram` (every expert loaded before timing,
IO-FREE there), `on-demand` (every chosen expert loaded at use, only the current layer kept,
IO-EXP), `lru` (cache, no preloading) and `edgemoe` (cache, predictor, preloading, EdgeMoE
eviction), plus `edgemoe:PREDICTOR:POLICY` combinations and `llama.cpp` (llama-cpp-python on a
GGUF file with its default mmap loading). Each run is a fresh process, optionally after dropping
the page cache and inside a memory cgroup.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgemoe.runtime.budget import format_bytes, parse_size

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS = ["Once upon a time", "Lily and Ben went to the park. They saw",
                   "The little dog was sad because"]
CHILD_TIMEOUT_SECONDS = 3600


@dataclass
class BenchConfig:
    bundles: list[str]  # measured side by side: every budget and mode runs on each in turn
    budgets: list[str]
    modes: list[str]
    prompts: list[str]
    max_tokens: int = 64
    repeat: int = 3
    drop_caches: bool = False
    memory_cap: str | None = None
    gguf: str | None = None
    threads: int = 0
    notes: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (bundle, budget) pairs not run


# Page cache and memory cgroups


def drop_page_cache() -> str | None:
    """Drop the page cache; return why it could not be done, or None."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return None
    except OSError as exc:
        return f"cannot drop the page cache ({exc.strerror}); run as root for cold-storage figures"


class MemoryCgroup:
    """A memory cgroup (v2, else v1) that caps a child process, page cache included."""

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        name = f"edgemoe-bench-{os.getpid()}"
        v2_root, v1_root = Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/memory")
        if (v2_root / "cgroup.controllers").is_file():
            self.path, self.limit_file = v2_root / name, "memory.max"
        elif v1_root.is_dir():
            self.path, self.limit_file = v1_root / name, "memory.limit_in_bytes"
        else:
            raise OSError("no memory cgroup hierarchy under /sys/fs/cgroup")
        self.path.mkdir(exist_ok=True)
        (self.path / self.limit_file).write_text(str(limit_bytes))

    def enter(self) -> None:
        """Move the calling process into the cgroup (used in the child before exec)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError as exc:
            logger.warning("could not remove cgroup %s: %s", self.path, exc)


# Running


def run_once(config: BenchConfig, bundle: str, mode: str, budget: str, cgroup: MemoryCgroup | None) -> dict:
    child = {"bundle": bundle, "mode": mode, "budget": budget, "prompts": config.prompts,
             "max_tokens": config.max_tokens, "threads": config.threads, "gguf": config.gguf}
    command = [sys.executable, "-m", "edgemoe.runtime.bench_run", json.dumps(child)]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT_SECONDS,
                                   preexec_fn=cgroup.enter if cgroup else None)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {CHILD_TIMEOUT_SECONDS} s"}
    lines = completed.stdout.strip().splitlines()
    if completed.returncode != 0 or not lines:
        tail = completed.stderr.strip().splitlines()[-1:] or [f"exit status {completed.returncode}"]
        killed = " (killed: the memory cap may be too small)" if completed.returncode == -9 else ""
        return {"error": tail[0] + killed}
    return json.loads(lines[-1])


def summarize(runs: list[dict]) -> dict:
    """Median and spread over repeats; errors are kept."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return {"error": runs[0]["error"] if runs else "no runs"}
    summary = {"repeats": len(good)}
    for key in ("decode_tokens_per_second", "time_to_first_token"):
        values = [r[key] for r in good]
        summary[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    for key in ("hit_rate", "stall_seconds_per_token", "bytes_read_per_token", "peak_rss_bytes",
                "budget_bytes", "load_seconds", "preloads", "preloads_used"):
        values = [r[key] for r in good if r.get(key) is not None]
        summary[key] = statistics.median(values) if values else None
    summary["recall"] = good[-1].get("recall", {})
    summary["predictor"] = good[-1].get("predictor")
    return summary


def run_bench(config: BenchConfig, progress=print) -> dict:
    """Run every (budget, bundle, mode) `repeat` times; return {"config", "results": [...]}."""
    cgroup = None
    if config.memory_cap:
        cap = parse_size(config.memory_cap)
        try:
            cgroup = MemoryCgroup(cap)
            config.notes.append(f"memory cap {format_bytes(cap)} applied through {cgroup.path}")
        except OSError as exc:
            config.notes.append(f"memory cap not applied: {exc}")
    drop_note = None
    results = []
    labels = bundle_labels(config.bundles)
    try:
        for budget in config.budgets:
            for bundle in config.bundles:
                if (bundle, budget) in config.skipped:
                    continue
                for mode in config.modes:
                    independent = mode in ("all-in-ram", "llama.cpp")
                    if independent and budget != config.budgets[0]:
                        continue  # independent of the expert budget: measured once
                    if mode == "llama.cpp" and bundle != config.bundles[0]:
                        continue  # runs the GGUF file, whichever bundle
                    budget_label = "-" if independent else budget
                    runs = []
                    for repeat in range(config.repeat):
                        if config.drop_caches:
                            drop_note = drop_page_cache() or drop_note
                        started = time.perf_counter()
                        runs.append(run_once(config, bundle, mode, budget, cgroup))
                        rate = runs[-1].get("decode_tokens_per_second")
                        outcome = f"{rate:.1f} tok/s" if rate is not None else f"error: {runs[-1].get('error')}"
                        where = f"{labels[bundle]} " if len(config.bundles) > 1 else ""
                        progress(f"{where}{mode} @ {budget_label} run {repeat + 1}/{config.repeat}: {outcome} "
                                 f"({time.perf_counter() - started:.1f} s)")
                    results.append({"bundle": labels[bundle], "mode": mode, "budget": budget_label,
                                    **summarize(runs)})
    finally:
        if cgroup is not None:
            cgroup.remove()
    if drop_note:
        config.notes.append(drop_note)
    elif config.drop_caches:
        config.notes.append("page cache dropped before each run")
    return {"config": {k: v for k, v in config.__dict__.items()}, "results": results}


# Reporting


def bundle_labels(bundles: list[str]) -> dict[str, str]:
    """Short name of each bundle for tables: its directory name, or the whole path when two share it."""
    names = [Path(b).name for b in bundles]
    return {b: name if names.count(name) == 1 else b for b, name in zip(bundles, names)}


def format_table(report: dict) -> str:
    several = len(report["config"]["bundles"]) > 1
    header = (("bundle",) if several else ()) + (
        "mode", "budget", "decode tok/s (min-max)", "TTFT s", "hit rate", "recall", "stall ms/tok",
        "read MB/tok", "peak RSS")
    rows = [header]
    for r in report["results"]:
        first = (r["bundle"],) if several else ()
        if "error" in r:
            rows.append(first + (r["mode"], r["budget"], "error: " + r["error"], "", "", "", "", "", ""))
            continue
        tps, ttft = r["decode_tokens_per_second"], r["time_to_first_token"]
        recall = r["recall"].get(r["predictor"]) if r.get("predictor") else None
        rows.append(first + (
            r["mode"], r["budget"], f"{tps['median']:.1f} ({tps['min']:.1f}-{tps['max']:.1f})",
            f"{ttft['median']:.3f}", _fmt(r.get("hit_rate"), "{:.2f}"), _fmt(recall, "{:.2f}"),
            _fmt(r.get("stall_seconds_per_token"), "{:.1f}", 1000), _fmt(r.get("bytes_read_per_token"), "{:.1f}", 1e-6),
            format_bytes(r["peak_rss_bytes"]) if r.get("peak_rss_bytes") else "-"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines += [f"note: {n}" for n in report["config"].get("notes", [])]
    return "\n".join(lines)


def _fmt(value, pattern: str, scale: float = 1.0) -> str:
    return "-" if value is None else pattern.format(value * scale)


def plot(report: dict, path: str) -> None:
    """PNG of decode tokens/s and hit rate against the budget, one line per mode.

    Raises:
        RuntimeError: matplotlib is not installed.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError(f"--plot needs matplotlib ({exc}); pip install matplotlib") from None
    figure, (speed, hits) = plt.subplots(1, 2, figsize=(11, 4))
    several = len(report["config"]["bundles"]) > 1
    lines = sorted({(r["bundle"], r["mode"]) for r in report["results"] if "error" not in r})
    budgets = report["config"]["budgets"]
    for bundle, mode in lines:
        rows = [r for r in report["results"] if (r["bundle"], r["mode"]) == (bundle, mode) and "error" not in r]
        label = f"{bundle} {mode}" if several else mode
        if rows and rows[0]["budget"] == "-":
            speed.axhline(rows[0]["decode_tokens_per_second"]["median"], linestyle="--", label=label)
            continue
        xs = [b for b in budgets if any(r["budget"] == b for r in rows)]
        by_budget = {r["budget"]: r for r in rows}
        speed.plot(xs, [by_budget[b]["decode_tokens_per_second"]["median"] for b in xs], marker="o", label=label)
        hits.plot(xs, [by_budget[b]["hit_rate"] or 0 for b in xs], marker="o", label=label)
    speed.set(xlabel="expert budget", ylabel="decode tokens/s", title="decode speed")
    hits.set(xlabel="expert budget", ylabel="expert hit rate", title="expert cache hit rate", ylim=(0, 1))
    speed.legend()
    hits.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
