"""`edgemoe profile`: record a bundle's routing profile from calibration text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from edgemoe.runtime.engine import Engine, EngineOptions
from edgemoe.runtime.evaluate import split_windows
from edgemoe.runtime.manifest import load_manifest
from edgemoe.runtime.tokenizer import BundleTokenizer


def profile_bundle(bundle: str | Path, text: str, window: int | None = None, source: str = "",
                   progress: bool = False) -> dict:
    """Run the bundle over `text` in windows, store the routing profile in the bundle, and return
    a summary with each predictor's online recall (every prediction uses only earlier tokens).

    Raises:
        ValueError: the text has fewer than 2 tokens or the window is outside [2, context].
    """
    bundle = Path(bundle)
    manifest = load_manifest(bundle)
    engine = Engine(bundle, EngineOptions(predictor=None, preload=False, use_profile=False))
    tokenizer = BundleTokenizer(bundle, manifest)
    context = engine.context_length
    window = window if window is not None else min(256, context)
    if not 2 <= window <= context:
        raise ValueError(f"--window must be in [2, {context}] (the context window), got {window}")
    windows = split_windows(tokenizer.encode(text, add_special_tokens=False), window)
    if not windows:
        raise ValueError("the calibration text has fewer than 2 tokens; give a longer text")
    for chunk in tqdm(windows, desc="profile", unit="window", disable=not progress):
        engine.forward(np.asarray(chunk), engine.new_cache())
    engine.close()
    engine.routing.save(bundle, manifest, source=str(source))
    return {"bundle": str(bundle), "tokens": int(engine.routing.tokens), "windows": len(windows),
            "recall": engine.recall()}
