"""Chat messages for every LLM call of the pipeline.

Bump PROMPT_VERSION whenever a prompt changes in a way that changes results, so cached
outputs made with older prompts are not reused.
"""

from __future__ import annotations

import functools

from mora_graphql.languages import language_name
from mora_graphql.pipeline.code import split_code_lines
from mora_graphql.pipeline.transcript import TranscriptChunk

PROMPT_VERSION = "1"

Message = dict[str, str]

TIMELINE_EXAMPLE = (
    '{"segments":[{"startTime":0,"endTime":42.5,"description":"...","startLine":1,"endLine":8}]}'
)

_TRANSCRIPT_NOTE = (
    "The transcript comes from the video's subtitles, one line per caption in the form "
    "`[m:ss] text`. It is often produced by speech recognition: expect missing "
    "punctuation, misheard or spelled-out identifiers, and filler words. It may be in "
    "Chinese or another language even though the code is in English."
)

_CODE_ONLY = (
    "Reply with the code only: no explanation before or after it and no markdown code "
    "fences (```). Comments inside the code are allowed and welcome where they explain "
    "what the video explains."
)


def _system(text: str) -> Message:
    return {"role": "system", "content": text}


def _user(text: str) -> Message:
    return {"role": "user", "content": text}


def _transcript(lines: list[str]) -> str:
    return "\n".join(lines) if lines else "(empty transcript)"


@functools.lru_cache(maxsize=4)
def numbered_code(code: str) -> str:
    """The code with `  1| ` style line numbers, numbered like `split_code_lines`. (The
    timeline prompt measures it before it uses it: the second time it comes from a cache.)"""
    lines = split_code_lines(code)
    width = max(3, len(str(len(lines))))
    return "\n".join(
        f"{n:>{width}}|" + (f" {line}" if line else "") for n, line in enumerate(lines, start=1)
    )


def code_messages(transcript_lines: list[str], language: str, title: str | None) -> list[Message]:
    """Generate one complete program from the whole transcript."""
    name = language_name(language)
    system = (
        "You are an expert programmer who reconstructs the code taught in programming "
        f"tutorial videos. Write ONE complete, runnable {name} program that implements "
        "everything the video teaches, in the order it is taught. Fill in the parts the "
        "video only implies (imports, helper functions, a main entry point, sample data "
        "instead of missing files) so that the program runs as is. Use the identifiers "
        "the video uses when they can be recognised. "
        f"{_TRANSCRIPT_NOTE} {_CODE_ONLY}"
    )
    header = f"Video title: {title.strip()}\n" if title and title.strip() else ""
    user = (
        f"{header}Target language: {name}\n\n"
        f"Transcript:\n{_transcript(transcript_lines)}\n\n"
        f"Write the complete {name} program now."
    )
    return [_system(system), _user(user)]


def chunk_extract_messages(
    chunk: TranscriptChunk, language: str, index: int, total: int
) -> list[Message]:
    """Extract the code taught in one part of a long transcript; `index` is 0-based."""
    name = language_name(language)
    system = (
        "You are an expert programmer who reconstructs the code taught in programming "
        "tutorial videos. The transcript of a long video has been split into parts that "
        "overlap slightly. For the part you are given, write the "
        f"{name} code that is taught or changed in this part: complete definitions, "
        "statements and imports it needs, as it stands at the end of the part. Do not "
        "invent code for topics of other parts; the parts will be merged afterwards. "
        f"If this part teaches no code, reply with a single {name} comment saying so. "
        f"{_TRANSCRIPT_NOTE} {_CODE_ONLY}"
    )
    user = (
        f"Target language: {name}\n"
        f"Part {index + 1} of {total}, video time {chunk.start:.0f}s to {chunk.end:.0f}s.\n\n"
        f"Transcript of this part:\n{_transcript(list(chunk.lines))}\n\n"
        f"Write the {name} code taught in this part now."
    )
    return [_system(system), _user(user)]


def merge_messages(partials: list[str], language: str) -> list[Message]:
    """Merge the per-part code of a long video into one program."""
    name = language_name(language)
    system = (
        "You are an expert programmer. You receive code extracted, in order, from "
        "consecutive parts of the same programming tutorial video. Merge it into ONE "
        f"complete, runnable {name} program: keep every feature taught, remove duplicates "
        "that come from overlapping parts, keep the latest version when the video rewrote "
        "a definition, gather imports at the top, and add whatever glue is needed (such as "
        f"a main entry point) for the program to run as is. {_CODE_ONLY}"
    )
    parts = "\n\n".join(
        f"=== Part {n} of {len(partials)} ===\n{text.strip()}"
        for n, text in enumerate(partials, start=1)
    )
    user = f"Target language: {name}\n\n{parts}\n\nWrite the merged {name} program now."
    return [_system(system), _user(user)]


def timeline_messages(code: str, transcript_lines: list[str], duration: float) -> list[Message]:
    """Map video time ranges to code line ranges; for a JSON-mode call."""
    line_count = len(split_code_lines(code))
    system = (
        "You align a programming tutorial video with the code it teaches. Reply with a "
        "single json object and nothing else, shaped exactly like this example:\n"
        f"{TIMELINE_EXAMPLE}\n"
        "Rules:\n"
        "- startTime and endTime are seconds (numbers) of the video; 0 <= startTime < "
        "endTime <= the video duration.\n"
        "- Segments are sorted by startTime and do not overlap; together they should cover "
        "the parts of the video that teach code.\n"
        "- startLine and endLine are the 1-based line numbers (as shown before the `|`) of "
        "the code explained in that segment, startLine <= endLine <= the number of code "
        "lines. Use null for both when a segment explains no particular code.\n"
        "- Use one segment per topic (typically one function, class or step); do not make "
        "one segment for the whole video.\n"
        "- description is one short sentence (at most 100 characters) in the language "
        "of the transcript.\n"
        f"{_TRANSCRIPT_NOTE}"
    )
    user = (
        f"Video duration: {duration:.1f} seconds\n"
        f"Number of code lines: {line_count}\n\n"
        f"Code (line number, `|`, line):\n{numbered_code(code)}\n\n"
        f"Transcript:\n{_transcript(transcript_lines)}\n\n"
        "Return the json object now."
    )
    return [_system(system), _user(user)]


def repair_messages(code: str, error: str, language: str) -> list[Message]:
    """Fix a program that failed the syntax check."""
    name = language_name(language)
    system = (
        f"You are an expert {name} programmer. Fix the program so that it is valid, "
        "complete and runnable, changing as little as possible and keeping its behaviour, "
        f"structure, names and comments. Return the complete corrected program. {_CODE_ONLY}"
    )
    user = f"Error reported by the checker:\n{error.strip()}\n\nProgram:\n{code}"
    return [_system(system), _user(user)]
