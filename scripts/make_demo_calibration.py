"""Write the built-in calibration text: stories sampled from the demo model itself.

`edgemoe export --expert-bits auto` measures perplexity on this text when no --calibration file
is given. Sampling it from the fp32 demo model keeps it in the model's domain without taking
any text from the evaluation corpus, so `edgemoe eval` on that corpus stays a held-out test.

Usage: python scripts/make_demo_calibration.py [--stories 24] [--out runtime/demo/calibration.txt]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from edgemoe.runtime.demo import demo_bundle
from edgemoe.runtime.engine import Engine, EngineOptions
from edgemoe.runtime.generation import Generator
from edgemoe.runtime.sampling import SamplingParams
from edgemoe.runtime.tokenizer import BundleTokenizer

OPENINGS = ("Once upon a time", "One day", "Tom and Sue", "There was a big", "Lily wanted to",
            "The sun was", "A little bird", "Max had a")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stories", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "runtime/demo/calibration.txt")
    args = parser.parse_args()

    bundle = demo_bundle()
    engine = Engine(bundle, EngineOptions(predictor=None, preload=False, measure_recall=False))
    tokenizer = BundleTokenizer(bundle, engine.manifest)
    generator = Generator(engine, tokenizer)
    stories = []
    for seed in tqdm(range(args.stories), desc="stories", unit="story"):
        opening = OPENINGS[seed % len(OPENINGS)]
        # Temperature 1 with no filters samples the model's own distribution.
        params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=seed)
        result = generator.generate(tokenizer.encode(opening), args.max_tokens, params)
        stories.append((opening + result.text).strip())
    args.out.write_text("\n\n".join(stories) + "\n", encoding="utf-8")
    print(f"wrote {len(stories)} stories, {args.out.stat().st_size} bytes, to {args.out}")


if __name__ == "__main__":
    main()
