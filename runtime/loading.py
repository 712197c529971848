"""Opening a model for the CLI and the server: bundle path, expert budget, engine, tokenizer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from edgemoe.runtime.budget import BudgetError, format_bytes, parse_size
from edgemoe.runtime.engine import Engine, EngineOptions
from edgemoe.runtime.generation import Generator
from edgemoe.runtime.kernels import runtime_manifest
from edgemoe.runtime.manifest import Manifest, verify_file
from edgemoe.runtime.tokenizer import BundleTokenizer

logger = logging.getLogger(__name__)

AUTO_BUDGET = "auto"


@dataclass
class LoadedModel:
    bundle: Path
    engine: Engine
    tokenizer: BundleTokenizer
    generator: Generator

    @property
    def manifest(self) -> Manifest:
        return self.engine.manifest


def resolve_bundle(path: str | Path | None) -> Path:
    """Return the given bundle directory, or the built-in demo bundle when `path` is None."""
    if path is None:
        from edgemoe.runtime.demo import demo_bundle
        return demo_bundle()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"bundle directory {path} not found")
    return path


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux, Android), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def resolve_budget(text: str | None, manifest: Manifest) -> int:
    """Bytes of expert budget for `--expert-budget` TEXT.

    `auto` (the default) is all experts, capped at half the memory available now, and never
    below the minimum the model needs.
    """
    total = manifest.expert_bytes
    if text is None or text.strip().lower() == AUTO_BUDGET:
        budget = total
        available = available_memory_bytes()
        if available is not None and available // 2 < total:
            budget = max(available // 2, manifest.min_expert_budget)
            logger.info("expert budget auto: %s (half of the %s available)", format_bytes(budget),
                        format_bytes(available))
        return budget
    try:
        return parse_size(text, total=total)
    except BudgetError as exc:
        raise BudgetError(f"--expert-budget: {exc}") from None


def load_model(path: str | Path | None, budget: str | None = None, threads: int = 0,
               verify: bool = True, **engine_options) -> LoadedModel:
    """Open a bundle (None: the demo model); `engine_options` are further EngineOptions fields."""
    bundle = resolve_bundle(path)
    manifest = runtime_manifest(bundle, engine_options.get("widen_2bit"))
    budget_bytes = resolve_budget(budget, manifest)
    engine = Engine(bundle, EngineOptions(budget_bytes=budget_bytes, threads=threads, verify=verify,
                                          **engine_options))
    if verify:
        # The engine verifies only the graph files, so the tokenizer files are verified here.
        for name in filter(None, manifest.tokenizer.values()):
            verify_file(bundle, manifest, name)
    tokenizer = BundleTokenizer(bundle, engine.manifest)
    logger.info("loaded %s from %s: expert budget %s of %s (%.0f%%)", manifest.architecture, bundle,
                format_bytes(budget_bytes), format_bytes(manifest.expert_bytes),
                100 * budget_bytes / manifest.expert_bytes)
    return LoadedModel(bundle, engine, tokenizer, Generator(engine, tokenizer))
