"""Text to a terminal as it is decoded.

Byte-level BPE splits a multi-byte character over several tokens, so the text of a prefix of the
tokens may end in half a character (decoded as U+FFFD). ``TextStream`` decodes all tokens so far and
writes only what is new and complete: a trailing U+FFFD waits for the next token. Decoding stops at
``<|endoftext|>`` (rows keep emitting it once done).
"""

from __future__ import annotations

from typing import TextIO

import torch

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, tokenizer, out: TextIO) -> None:
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.written = ""
        self.ended = False

    def push(self, ids: torch.Tensor) -> None:
        """One decoding step's new ids (batch of 1)."""
        token = int(ids[0])
        if self.ended or token == self.tokenizer.eos_id:
            self.ended = True
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith(REPLACEMENT):
            return
        self._write(text)

    def close(self) -> None:
        """Whatever is left (a character never completed is written as U+FFFD), then a newline."""
        self._write(self.tokenizer.decode(self.ids))
        self.out.write("\n")
        self.out.flush()

    def _write(self, text: str) -> None:
        if text.startswith(self.written):
            self.out.write(text[len(self.written):])
        else:  # a merge changed earlier text (not expected of byte-level BPE): write the whole again
            self.out.write("\n" + text)
        self.out.flush()
        self.written = text


__all__ = ["TextStream"]
