"""The bundle's tokenizer (Hugging Face `tokenizers`) and its special-token ids."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from edgemoe.runtime.manifest import Manifest


class BundleTokenizer:
    def __init__(self, bundle_dir: str | Path, manifest: Manifest):
        bundle_dir = Path(bundle_dir)
        self.tokenizer = Tokenizer.from_file(str(bundle_dir / manifest.tokenizer["tokenizer"]))
        # Text such as "<|endoftext|>" typed by a user stays text; only the post-processor (BOS)
        # and, later, a chat template insert real special tokens.
        self.tokenizer.encode_special_tokens = True
        config_name = manifest.tokenizer.get("tokenizer_config")
        self.config = json.loads((bundle_dir / config_name).read_text()) if config_name else {}
        self.eos_token_ids = set(manifest.config.eos_token_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token markup inside it is encoded as plain text."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)
