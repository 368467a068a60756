"""Incremental detokenization and stop-string checks, O(new tokens) per step."""
from __future__ import annotations

from adadepth.engine.sequence import Sequence


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def update(self, seq: Sequence) -> None:
        """Append the text of seq's newest token(s) to seq.output_text.

        Decoding a window that starts a few tokens back keeps multi-token characters and
        leading-space rules right; text that ends in U+FFFD is an unfinished character, kept back.
        """
        ids = seq.output_token_ids
        prefix_offset, read_offset = seq.detok_offsets
        skip = seq.params.skip_special_tokens
        prefix_text = self.tokenizer.decode(ids[prefix_offset:read_offset], skip_special_tokens=skip)
        new_text = self.tokenizer.decode(ids[prefix_offset:], skip_special_tokens=skip)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            seq.output_text += new_text[len(prefix_text):]
            prefix_offset, read_offset = read_offset, len(ids)
        seq.detok_offsets = (prefix_offset, read_offset)

    def flush(self, seq: Sequence) -> None:
        """At finish: emit any text held back waiting for the rest of a multi-byte character."""
        full = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=seq.params.skip_special_tokens)
        if len(full) > len(seq.output_text) and full.startswith(seq.output_text):
            seq.output_text = full

    @staticmethod
    def check_stop_strings(seq: Sequence, new_chars: int) -> str | None:
        """If a stop string appeared in the newest text, cut the text before it and return it."""
        stops = seq.params.stop
        if not stops or new_chars == 0:
            return None
        longest = max(len(s) for s in stops)
        start = max(0, len(seq.output_text) - new_chars - longest + 1)
        for stop in stops:
            idx = seq.output_text.find(stop, start)
            if idx != -1:
                seq.output_text = seq.output_text[:idx]
                return stop
        return None

    @staticmethod
    def visible_length(seq: Sequence) -> int:
        """How much of the text is safe to show while running: all but a tail that could still
        grow into a stop string (a stop string, once found, is cut before any shown text)."""
        if seq.is_finished or not seq.params.stop:
            return len(seq.output_text)
        hold = max(len(s) for s in seq.params.stop) - 1
        return max(0, len(seq.output_text) - hold)
