"""Extracting, checking and naming the generated code."""

from __future__ import annotations

import ast
import warnings
from dataclasses import dataclass

from mora_graphql.languages import normalize_language

FENCE = "```"


def split_code_lines(code: str) -> list[str]:
    """The code's lines as an editor numbers them (line k is item k-1); [] for blank code.

    Trailing blank lines are not counted.
    """
    if not code.strip():
        return []
    return code.replace("\r\n", "\n").replace("\r", "\n").rstrip().split("\n")


def _is_fence(line: str) -> bool:
    """A line that opens or closes a fenced block: ``` plus an info string without backticks."""
    stripped = line.lstrip()
    return stripped.startswith(FENCE) and "`" not in stripped.lstrip("`")


def _trim(text: str) -> str:
    """Drop leading whitespace-only lines and all trailing whitespace."""
    for index, char in enumerate(text):
        if not char.isspace():
            return text[text.rfind("\n", 0, index) + 1 :].rstrip()
    return ""


def strip_code_fences(text: str) -> str:
    """The code in an LLM reply.

    Without fence lines the whole reply is the code. Otherwise the reply is cut into
    fenced blocks (an unclosed last block runs to the end; inside a block any fence
    line closes it, so the result never contains a fence line, which makes this
    idempotent) and the largest block wins, the first one on ties. Joining blocks was
    rejected: replies that show pieces and then the full program would duplicate code.
    When every block is empty the reply minus its fence lines is used, so a stray
    fence never loses the code.
    """
    lines = text.split("\n")
    if not any(_is_fence(line) for line in lines):
        return _trim(text)
    best = ""
    block: list[str] | None = None
    for line in [*lines, FENCE]:
        if not _is_fence(line):
            if block is not None:
                block.append(line)
        elif block is None:
            block = []
        else:
            content = _trim("\n".join(block))
            if len(content) > len(best):
                best = content
            block = None
    if best:
        return best
    return _trim("\n".join(line for line in lines if not _is_fence(line)))


LOOKAHEAD_LINES = 3
"""Lines a streamed reply's start is held for while it may still be prose before a fence.
Code the model was asked to send bare waits that long before its first line is released (at
50 tokens/s, six lines held the first lines of every session for about 150 ms); a preamble
("Here is the code:") longer than this ends in a reset and the whole code instead."""


class StreamingFenceFilter:
    """Incremental `strip_code_fences` for a streamed reply.

    `feed` only releases text it is sure of: prose before an opening fence is held while
    at most `lookahead_lines` non-blank lines have arrived, fence lines are never
    released, trailing whitespace and a line that may still become a fence are held.
    `finish` compares what was released with `strip_code_fences` of the whole reply and
    returns the missing rest, so the concatenation is exact whenever the released text
    is a prefix of the final code. That holds for plain code (also with stray fence
    lines) and for one fenced block with prose before and after it.

    Shapes where it cannot be exact (`exact` is False after `finish`, which then
    returns ""; the caller should publish a reset and `result`):
    - more than `lookahead_lines` lines of prose before the first fence (the prose
      was released as code);
    - a later fenced block larger than the first one (the first block was released);
    - plain code released before a fence line, followed by a non-empty fenced block.
    """

    def __init__(self, lookahead_lines: int = LOOKAHEAD_LINES) -> None:
        self.lookahead_lines = lookahead_lines
        self._raw: list[str] = []
        self._emitted: list[str] = []
        self._state = "start"
        self._held: list[str] = []
        self._line = ""
        self._line_sent = 0
        self._pending_ws = ""
        self._started = False
        self._result: str | None = None
        self.exact = True

    @property
    def result(self) -> str:
        """The final code: `strip_code_fences` of everything fed so far."""
        if self._result is not None:
            return self._result
        return strip_code_fences("".join(self._raw))

    def feed(self, delta: str) -> str:
        if self._result is not None:
            raise RuntimeError("feed() after finish()")
        self._raw.append(delta)
        out: list[str] = []
        self._line += delta
        while (newline := self._line.find("\n")) >= 0:
            line, self._line = self._line[:newline], self._line[newline + 1 :]
            sent, self._line_sent = self._line_sent, 0
            self._complete_line(line, sent, out)
        if self._state in ("plain", "block"):
            stripped = self._line.lstrip()
            if stripped and not stripped.startswith("`"):
                self._body(self._line[self._line_sent :], out)
                self._line_sent = len(self._line)
        text = "".join(out)
        self._emitted.append(text)
        return text

    def finish(self) -> str:
        """Flush: the rest of the final code, or "" when the stream diverged (see class doc)."""
        if self._result is not None:
            return ""
        self._result = strip_code_fences("".join(self._raw))
        emitted = "".join(self._emitted)
        if not self._result.startswith(emitted):
            self.exact = False
            return ""
        return self._result[len(emitted) :]

    def _complete_line(self, line: str, sent: int, out: list[str]) -> None:
        fence = sent == 0 and _is_fence(line)
        if self._state == "start":
            if fence:
                self._held.clear()
                self._state = "block"
                return
            self._held.append(line)
            if sum(1 for held in self._held if held.strip()) > self.lookahead_lines:
                self._state = "plain"
                for held in self._held:
                    self._body(held + "\n", out)
                self._held.clear()
        elif self._state == "plain":
            if not fence:
                self._body(line[sent:] + "\n", out)
        elif self._state == "block":
            if fence:
                self._state = "after"
            else:
                self._body(line[sent:] + "\n", out)

    def _body(self, text: str, out: list[str]) -> None:
        """Release body text, holding leading blank lines and trailing whitespace."""
        last = len(text.rstrip()) - 1
        if last < 0:
            self._pending_ws += text
            return
        piece = self._pending_ws + text[: last + 1]
        self._pending_ws = text[last + 1 :]
        if not self._started:
            self._started = True
            piece = _trim(piece)
        out.append(piece)


@dataclass(frozen=True)
class CodeCheck:
    ok: bool
    language: str
    error: str | None
    line: int | None


def check_code(code: str, language: str) -> CodeCheck:
    """Syntax-check Python; other languages pass unless the code is empty."""
    lang = normalize_language(language) or language.strip().lower()
    if not code.strip():
        return CodeCheck(ok=False, language=lang, error="the code is empty", line=None)
    if lang == "python":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ast.parse(code)
        except SyntaxError as exc:
            return CodeCheck(ok=False, language=lang, error=exc.msg, line=exc.lineno)
        except (ValueError, RecursionError, MemoryError) as exc:
            return CodeCheck(
                ok=False, language=lang, error=str(exc) or type(exc).__name__, line=None
            )
    return CodeCheck(ok=True, language=lang, error=None, line=None)
