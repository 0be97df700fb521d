"""Stage 2: the program, streamed from the LLM as code deltas, checked, repaired once."""

from __future__ import annotations

import math

from mora_graphql.errors import ErrorCode, PipelineError
from mora_graphql.pipeline import prompts
from mora_graphql.pipeline.code import (
    CodeCheck,
    StreamingFenceFilter,
    check_code,
    strip_code_fences,
)
from mora_graphql.pipeline.context import (
    PROGRESS_CODE_DONE,
    PROGRESS_SUBTITLES_DONE,
    RunContext,
)
from mora_graphql.pipeline.offload import off_loop
from mora_graphql.pipeline.transcript import chunk_transcript, compact_lines, estimate_tokens
from mora_graphql.providers.subtitles.base import Transcript

CODE_CHARS_SCALE = 4_000.0
CHUNK_PROGRESS_SPAN = 0.3
"""Progress spent on per-chunk extraction of a long transcript."""


async def generate_code(run: RunContext, transcript: Transcript) -> tuple[str, CodeCheck]:
    """Stream the program; beyond the budget, extract per chunk and merge. Then check it
    and, when the check fails, one repair round with the error sent back."""
    budget = run.settings.llm_prompt_token_budget
    chunks = chunk_transcript(transcript.lines, budget)
    language = run.row.language
    title = transcript.info.title
    if len(chunks) <= 1:
        messages = prompts.code_messages(compact_lines(transcript.lines), language, title)
    else:
        partials = []
        for chunk in chunks:
            extract = prompts.chunk_extract_messages(chunk, language, chunk.index, len(chunks))
            partials.append(strip_code_fences(await collect(run, extract)))
            run.recorder.advance(
                PROGRESS_SUBTITLES_DONE + CHUNK_PROGRESS_SPAN * (chunk.index + 1) / len(chunks)
            )
        partials = await _reduce(run, partials, language, budget)
        messages = prompts.merge_messages(partials, language)
    code = await _stream_code(run, messages)
    if not code.strip():
        raise PipelineError(ErrorCode.AI_GENERATION_FAILED, "The model returned no code.")
    check = await checked(code, language)
    if not check.ok and check.error:
        error = f"line {check.line}: {check.error}" if check.line else check.error
        repaired = strip_code_fences(
            await collect(run, prompts.repair_messages(code, error, language))
        )
        repaired_check = await checked(repaired, language)
        if repaired.strip() and repaired_check.ok:
            await run.recorder.replace_code(repaired)
            code, check = repaired, repaired_check
    return code, check


async def checked(code: str, language: str) -> CodeCheck:
    """`check_code` off the event loop: parsing a long program takes milliseconds, and the
    runs of many sessions end about together."""
    return await off_loop(check_code, code, language)


async def _reduce(run: RunContext, partials: list[str], language: str, budget: int) -> list[str]:
    """Merge the per-chunk code in groups until all of it fits one merge prompt."""
    while len(partials) > 1 and estimate_tokens("\n".join(partials)) > budget:
        groups: list[list[str]] = []
        for part in partials:
            cost = estimate_tokens(part)
            if groups and (
                len(groups[-1]) < 2 or estimate_tokens("\n".join(groups[-1])) + cost <= budget
            ):
                groups[-1].append(part)
            else:
                groups.append([part])
        if len(groups[-1]) == 1 and len(groups) > 1:
            groups[-2].extend(groups.pop())
        merged = []
        for group in groups:
            messages = prompts.merge_messages(group, language)
            merged.append(strip_code_fences(await collect(run, messages)))
        partials = merged
    return partials


async def collect(run: RunContext, messages: list[dict[str, str]]) -> str:
    """A streamed call whose content is not code for the client (reasoning still streams)."""

    async def attempt(_n: int) -> str:
        parts: list[str] = []
        async for chunk in run.deps.llm.stream_chat(messages, usage=run.usage):
            if chunk.kind == "reasoning":
                await run.recorder.thought(chunk.text)
            else:
                parts.append(chunk.text)
        await run.recorder.flush()
        return "".join(parts)

    return await run.retrying(attempt)


async def _stream_code(run: RunContext, messages: list[dict[str, str]]) -> str:
    recorder = run.recorder

    async def attempt(_n: int) -> str:
        if recorder.code_started:
            await recorder.code_reset()
        fence = StreamingFenceFilter()
        async for chunk in run.deps.llm.stream_chat(messages, usage=run.usage):
            if chunk.kind == "reasoning":
                await recorder.thought(chunk.text)
            else:
                released = fence.feed(chunk.text)
                if released:
                    await recorder.code_delta(released, _code_progress(recorder.code))
            pause = recorder.read_pause()
            if pause is not None:
                await pause
        tail = fence.finish()
        if tail:
            await recorder.code_delta(tail)
        if not fence.exact:
            await recorder.replace_code(fence.result)
        # Nothing more can join the last delta: publish it now, not at the end of its window,
        # by which time the ends of other runs (checks, timelines) may hold up the loop.
        await recorder.flush()
        return fence.result

    return await run.retrying(attempt)


def _code_progress(code: str) -> float:
    span = PROGRESS_CODE_DONE - PROGRESS_SUBTITLES_DONE
    return PROGRESS_SUBTITLES_DONE + span * (1 - math.exp(-len(code) / CODE_CHARS_SCALE))
