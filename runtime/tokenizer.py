"""The bundle's tokenizer (Hugging Face `tokenizers`) and its special-token ids."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from edgemoe.runtime.manifest import Manifest


class BundleTokenizer:
    def __init__(self, bundle_dir: str | Path, manifest: Manifest):
        bundle_dir = Path(bundle_dir)
        path = str(bundle_dir / manifest.tokenizer["tokenizer"])
        # Text such as "<|endoftext|>" typed by a user stays text: `tokenizer` never parses
        # special tokens; `markup_tokenizer` does, for chat-template markup only.
        self.tokenizer = Tokenizer.from_file(path)
        self.tokenizer.encode_special_tokens = True
        self.markup_tokenizer = Tokenizer.from_file(path)
        config_name = manifest.tokenizer.get("tokenizer_config")
        self.config = json.loads((bundle_dir / config_name).read_text()) if config_name else {}
        self.eos_token_ids = set(manifest.config.eos_token_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of user text; special-token markup inside it is encoded as plain text.

        `add_special_tokens` lets the post-processor add its tokens (BOS for most models).
        """
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_markup(self, text: str) -> list[int]:
        """Token ids of template markup, where special-token strings become special tokens."""
        if not text:
            return []
        return self.markup_tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)
