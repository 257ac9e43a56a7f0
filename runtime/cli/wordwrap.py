"""WordWrap: streamed text written to a terminal without breaking words at its edge.

Text arrives in pieces (tokens); a word is held until the next space or newline shows where
it ends, then goes on the current line if it fits, else on a new one. A word longer than the
whole width is written as it comes (the terminal breaks it: nothing else can be done).
"""

from __future__ import annotations

from typing import TextIO


class WordWrap:
    def __init__(self, out: TextIO, width: int) -> None:
        self.out, self.width = out, max(width, 10)
        self.column = 0  # characters on the current line
        self.word = ""  # the word being received

    def write(self, text: str) -> None:
        for ch in text:
            if ch == "\n":
                self._flush_word()
                self.out.write("\n")
                self.column = 0
            elif ch in " \t":
                self._flush_word()
                if self.column == 0:
                    continue  # a space that would start a wrapped line is dropped
                if self.column >= self.width:
                    self.out.write("\n")
                    self.column = 0
                else:
                    self.out.write(ch)
                    self.column += 1
            else:
                self.word += ch
                if len(self.word) >= self.width:  # longer than a line: give up on it
                    self._flush_word()
        self.out.flush()

    def _flush_word(self) -> None:
        if not self.word:
            return
        if self.column + len(self.word) > self.width and self.column > 0:
            self.out.write("\n")
            self.column = 0
        self.out.write(self.word)
        self.column += len(self.word)
        if self.column > self.width:  # a word longer than a line: the terminal broke it
            self.column %= self.width
        self.word = ""

    def finish(self) -> None:
        """The answer ended: write the word still held."""
        self._flush_word()
        self.out.flush()
