"""Stage 3: the timeline, from the model (repaired) or by deterministic alignment."""

from __future__ import annotations

from typing import Any

import structlog

from mora_graphql.pipeline import prompts
from mora_graphql.pipeline.context import RunContext
from mora_graphql.pipeline.offload import off_loop
from mora_graphql.pipeline.timeline import final_timeline, parse_model_timeline
from mora_graphql.pipeline.transcript import estimate_tokens, fit_lines
from mora_graphql.providers.llm import LLMError
from mora_graphql.providers.subtitles.base import Transcript

log = structlog.get_logger("mora.pipeline")

TIMELINE_PROMPT_OVERHEAD = 600
"""Tokens of the timeline prompt besides the code and the transcript."""


async def build_timeline(run: RunContext, transcript: Transcript, code: str) -> dict[str, Any]:
    """The model's timeline (repaired, line ranges checked against what is said), or the
    deterministic alignment when the model fails or does not span the whole video."""
    duration = transcript.duration
    messages = await off_loop(
        timeline_prompt, code, transcript, run.settings.llm_prompt_token_budget
    )
    items = None
    try:
        raw = await run.retrying(lambda _n: run.deps.llm.complete_json(messages, usage=run.usage))
        items = parse_model_timeline(str(raw))
    except LLMError as exc:
        log.warning("timeline call failed; aligning instead", error=exc.message)
    # The alignment of a long transcript takes a tenth of a second or more: not on the loop.
    segments, source = await off_loop(
        final_timeline, items, code=code, duration=duration, transcript=transcript.lines
    )
    return {"segments": [segment.as_json() for segment in segments], "source": source}


def timeline_prompt(code: str, transcript: Transcript, budget: int) -> list[dict[str, str]]:
    """The timeline call's messages: the numbered code and as much of the transcript as fits."""
    code_tokens = estimate_tokens(prompts.numbered_code(code))
    allowance = max(budget - code_tokens - TIMELINE_PROMPT_OVERHEAD, budget // 4)
    lines = fit_lines(transcript.lines, allowance)
    return prompts.timeline_messages(code, lines, transcript.duration)
