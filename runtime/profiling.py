"""`edgemoe profile`: record a bundle's routing profile from calibration text."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edgemoe.runtime.engine import Engine, EngineOptions
from edgemoe.runtime.evaluate import split_windows
from edgemoe.runtime.manifest import load_manifest
from edgemoe.runtime.tokenizer import BundleTokenizer

logger = logging.getLogger(__name__)

MIN_PROFILE_TOKENS = 256


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
    tokens = sum(len(w) for w in windows)
    if tokens < MIN_PROFILE_TOKENS:
        raise ValueError(f"the calibration text has {tokens} tokens; a routing profile needs at least "
                         f"{MIN_PROFILE_TOKENS} (a few thousand give stable tables); give a longer text")
    if tokens < 2048:
        logger.warning("the calibration text has only %d tokens; the profile's tables will be noisy", tokens)
    for chunk in tqdm(windows, desc="profile", unit="window", disable=not progress):
        engine.forward(np.asarray(chunk), engine.new_cache())
    engine.close()
    engine.routing.save(bundle, manifest, source=str(source))
    return {"bundle": str(bundle), "tokens": int(engine.routing.tokens), "windows": len(windows),
            "recall": engine.recall()}
