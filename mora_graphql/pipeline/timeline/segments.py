"""Code-block segmentation: code cut into blocks (definitions, paragraphs), each with a
short description and the weighted words it matches in a transcript."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass


def _wordset(text: str) -> frozenset[str]:
    return frozenset(text.split())


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SUBWORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")
_CJK_RUN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]+")
_STOPWORDS = _wordset(
    """
    the and for this that with you your we our are was were will can just now then
    here there what when which who how not but all any its it's let lets going gonna
    want use using into from have has had get got make one two some more very also
    like okay yeah right see look thing things way well want need know think actually
    def class return import self none true false var let const function func public
    private protected static void new elif else try except finally pass lambda async
    await while std include using namespace package args null nil end begin then
    """
)
_DEF_START = re.compile(
    r"^(?:export\s+)?(?:default\s+)?(?:async\s+)?"
    r"(?:def|class|function|func|fn|fun|interface|struct|enum|trait|impl|type|module|object|"
    r"public|private|protected|internal|static|abstract|final|sealed|data|pub|template|sub|"
    r"proc|local\s+function|record)\b"
)
_ARROW_DEF = re.compile(
    r"^\s*(?:export\s+)?(?:const|let|var)\s+([A-Za-z_$][\w$]*)\s*=\s*(?:async\s*)?"
    r"(?:\([^)]*\)\s*=>|[A-Za-z_$][\w$]*\s*=>|function\b)"
)
_C_DEF = re.compile(r"^\s*(?:[\w:<>*&,\[\]]+\s+)+[*&]*([A-Za-z_~][\w:~]*)\s*\([^;]*$")
_NAMED_DEF = (
    re.compile(
        r"^\s*(?:export\s+)?(?:default\s+)?(?:async\s+)?(?:def|function\*?|fn|fun|func|sub|proc)"
        r"\s+(?:\([^)]*\)\s*)?([A-Za-z_$][\w$]*)"
    ),
    re.compile(
        r"^\s*(?:export\s+)?(?:(?:public|private|protected|internal|abstract|final|sealed|"
        r"static|data|pub(?:\([^)]*\))?)\s+)*"
        r"(?:class|struct|interface|enum|trait|object|record|impl|module)\s+([A-Za-z_$][\w$]*)"
    ),
    _ARROW_DEF,
)
_NOT_DEF_WORDS = _wordset(
    "if for while switch return else elif with assert print await yield del raise from "
    "import case do try throw new delete echo puts catch async lambda not and or in is "
    "except when go defer let var const"
)
_CONTINUATION = re.compile(
    r"^(?:[})\]]|(?:else|elif|except|finally|catch|end|done|fi|esac|rescue|ensure)\b)"
)
_ATTACHED = re.compile(
    r"^(?:@|#(?!include|define|pragma|import|if|endif|else|undef)|//|/\*|\s*\*|--|;)"
)
_COMMENT = re.compile(r"^\s*(?:#+|//+|/\*+|\*+|--+|<!--|;+|%+)\s*(.*?)\s*(?:\*/|-->)?\s*$")
_IMPORT = re.compile(
    r"^\s*(?:import|from\s+\S+\s+import|#include|using|require|package|use|library|"
    r"const\s+\w+\s*=\s*require)\b"
)


def _stem(word: str) -> str:
    for suffix in ("ing", "ed", "es", "s"):
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            if suffix == "s" and word.endswith("ss"):
                break
            word = word[: -len(suffix)]
            break
    if len(word) > 3 and word.endswith("e"):
        word = word[:-1]
    return word


def tokenize(text: str) -> set[str]:
    """Lower-cased, stemmed sub-words of identifiers and words, plus CJK bigrams."""
    out: set[str] = set()
    for ident in _IDENT.findall(text):
        for part in _SUBWORD.findall(ident):
            word = part.lower()
            if len(word) >= 3 and word not in _STOPWORDS and not word.isdigit():
                out.add(_stem(word))
    for run in _CJK_RUN.findall(text):
        out.update(run[i : i + 2] for i in range(len(run) - 1))
    return out


_MAYBE_DEF = re.compile(
    r"\(|\b(?:def|function|fn|fun|func|sub|proc|class|struct|interface|enum|trait|object|"
    r"record|impl|module|const|let|var)\b"
)
"""What every definition `_definition_name` names has: most lines of code have neither."""


def _definition_name(line: str) -> str | None:
    if not _MAYBE_DEF.search(line):
        return None
    for pattern in _NAMED_DEF:
        match = pattern.match(line)
        if match:
            return match.group(1)
    match = _C_DEF.match(line)
    if match and line.split(maxsplit=1)[0] not in _NOT_DEF_WORDS:
        return match.group(1)
    return None


def _is_def_start(line: str) -> bool:
    if line.rstrip().endswith(";"):
        return False
    if _DEF_START.match(line) or _ARROW_DEF.match(line):
        return True
    return bool(_C_DEF.match(line)) and line.split(maxsplit=1)[0] not in _NOT_DEF_WORDS


@dataclass(frozen=True)
class Block:
    first: int
    last: int
    description: str
    weights: dict[str, float]


def _describe(lines: Sequence[str]) -> str:
    name = next(filter(None, map(_definition_name, lines)), None)
    if name:
        return name
    for line in lines:
        if line.strip():
            match = _COMMENT.match(line)
            if match and match.group(1):
                return match.group(1)
            break
    code = [line for line in lines if line.strip()]
    if code and all(_IMPORT.match(line) for line in code):
        return "Imports"
    for line in code:
        comment = _COMMENT.match(line)
        if comment and comment.group(1):
            return comment.group(1)
    first = code[0].strip() if code else "Code"
    return first if len(first) <= 60 else first[:57].rstrip() + "..."


def _make_block(lines: Sequence[str], first: int, last: int, description: str) -> Block:
    """A block of 0-based lines first..last (inclusive)."""
    block = lines[first : last + 1]
    weights = dict.fromkeys(tokenize("\n".join(block)), 1.0)
    for name in filter(None, map(_definition_name, block)):
        for token in tokenize(name):
            weights[token] = 2.0
    return Block(first, last, description, weights)


def _split_starts(lines: Sequence[str], lo: int, hi: int, indent: str) -> list[int]:
    """Block starts within lines[lo:hi] at the given indentation level.

    A block starts after a blank line or at a definition; decorators and comments
    directly above a definition stay with it; deeper or shallower lines never start one.
    """
    starts: list[int] = []
    gap = False
    for i in range(lo, hi):
        line = lines[i]
        if not line.strip():
            gap = True
            continue
        body = line[len(indent) :]
        level = line.startswith(indent) and not body[:1].isspace()
        if not starts:
            starts.append(i)
        elif level and not _CONTINUATION.match(body):
            if gap:
                starts.append(i)
            elif _is_def_start(body):
                k = i
                while (
                    k - 1 >= starts[-1]
                    and lines[k - 1].startswith(indent)
                    and _ATTACHED.match(lines[k - 1][len(indent) :])
                ):
                    k -= 1
                if k > starts[-1]:
                    starts.append(k)
        gap = False
    return starts


def _inner_indent(lines: Sequence[str], lo: int, hi: int, indent: str) -> str | None:
    for line in lines[lo + 1 : hi]:
        if line.strip() and line.startswith(indent) and line[len(indent) :][:1].isspace():
            return line[: len(line) - len(line.lstrip())]
    return None


def split_blocks(lines: Sequence[str]) -> list[Block]:
    """Top-level blocks; code that is one block (a class, a namespace) is split one
    indentation level deeper, up to three levels. (A run's timeline asks twice for the
    blocks of the same code: the second time they come from a small cache.)"""
    return list(_split_blocks(tuple(lines)))


def count_blocks(lines: Sequence[str]) -> int:
    """How many blocks `split_blocks` makes, without describing and weighing them."""
    return len(_block_starts(tuple(lines)))


@functools.lru_cache(maxsize=8)
def _block_starts(lines: tuple[str, ...]) -> tuple[int, ...]:
    starts = _split_starts(lines, 0, len(lines), "")
    indent = ""
    for _ in range(3):
        if len(starts) != 1:
            break
        inner = _inner_indent(lines, starts[0], len(lines), indent)
        if inner is None:
            break
        indent = inner
        starts = _split_starts(lines, starts[0], len(lines), indent)
    return tuple(starts)


@functools.lru_cache(maxsize=8)
def _split_blocks(lines: tuple[str, ...]) -> tuple[Block, ...]:
    starts = _block_starts(lines)
    blocks: list[Block] = []
    for n, first in enumerate(starts):
        stop = starts[n + 1] if n + 1 < len(starts) else len(lines)
        last = max(i for i in range(first, stop) if lines[i].strip())
        blocks.append(_make_block(lines, first, last, _describe(lines[first : last + 1])))
    return tuple(blocks)


def merge_blocks(lines: Sequence[str], blocks: list[Block], limit: int) -> list[Block]:
    spans = [(b.first, b.last, [b.description]) for b in blocks]
    while len(spans) > limit:
        k = min(range(len(spans) - 1), key=lambda i: spans[i + 1][1] - spans[i][0])
        left, right = spans[k], spans[k + 1]
        spans[k : k + 2] = [(left[0], right[1], left[2] + right[2])]
    if len(spans) == len(blocks):
        return blocks
    merged: list[Block] = []
    for first, last, names in spans:
        description = ", ".join(dict.fromkeys(names[:3])) + (", ..." if len(names) > 3 else "")
        merged.append(_make_block(lines, first, last, description))
    return merged
