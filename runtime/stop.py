"""Cutting generated text at stop strings, also when a stop string spans several tokens or
stream chunks: text that could be the start of a stop string is held back until it cannot."""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stop: list[str]):
        self.stop = [s for s in stop if s]
        self.pending = ""  # text not yet released
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add generated text; return what is safe to release. Sets `stopped` on a match."""
        if self.stopped:
            return ""
        self.pending += text
        if not self.stop:
            released, self.pending = self.pending, ""
            return released
        # The match that ends first wins, and of those ending there the longest, because that is
        # where token-by-token streaming stops. Choosing the match that starts first would make
        # the cut depend on the chunks. With stops ["abcd", "bc"], "abc" + "d" would be cut at
        # "bc" but "abcd" in one chunk at "abcd".
        matches = [(i + len(s), i) for s in self.stop if (i := self.pending.find(s)) >= 0]
        if matches:
            _, cut = min(matches)
            released, self.pending, self.stopped = self.pending[:cut], "", True
            return released
        hold = self._partial_match_length()
        released = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return released

    def flush(self) -> str:
        """Release held-back text at the end of generation (no stop string completed)."""
        released, self.pending = ("" if self.stopped else self.pending), ""
        return released

    def _partial_match_length(self) -> int:
        """Longest suffix of the pending text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for length in range(min(len(s) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(s[:length]):
                    best = length
                    break
        return best
