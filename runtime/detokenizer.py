"""Incremental decoding of token ids to text that never emits a broken UTF-8 character.

Byte-level tokenizers split a multi-byte character over several tokens; decoding such a prefix
gives U+FFFD. Text is released only once the decoded window no longer ends in U+FFFD. Decoding a
short window (from `prefix_offset`) instead of all ids keeps each step O(window), and decoding
the window with its preceding tokens keeps tokenizers' leading-space handling right.
"""

from __future__ import annotations

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window that gives context to the new ids
        self.read_offset = 0  # ids before this have been released as text

    def add(self, token_id: int) -> str:
        """Append one token and return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """Return text still held back (an incomplete character decodes as U+FFFD)."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):]
