"""The timeline: video time ranges mapped to code line ranges.

A model-made timeline is parsed leniently and repaired; `align_timeline` is the
deterministic fallback that matches transcript windows to code blocks.

Modules, each depending only on those listed before it:
`values` (lenient parsing of single values), `model` (the segment, its invariants,
`sanitize`), `parse` (segment items in the model's output), `segments` (code blocks),
`align` (transcript windows matched to blocks), `repair` (the model timeline repaired, or
replaced by the alignment). This module only re-exports.
"""

from mora_graphql.pipeline.timeline.align import (
    MAX_BLOCKS,
    MAX_WINDOWS,
    PRIOR_WEIGHT,
    WINDOWS_PER_BLOCK,
    align_timeline,
    fix_line_ranges,
)
from mora_graphql.pipeline.timeline.model import MAX_DESCRIPTION, TimelineSegment, check_invariants
from mora_graphql.pipeline.timeline.parse import MAX_RAW_CHARS, parse_model_timeline
from mora_graphql.pipeline.timeline.repair import (
    SPAN_TOLERANCE,
    final_timeline,
    repair_timeline,
    timeline_spans,
)

__all__ = [
    "MAX_BLOCKS",
    "MAX_DESCRIPTION",
    "MAX_RAW_CHARS",
    "MAX_WINDOWS",
    "PRIOR_WEIGHT",
    "SPAN_TOLERANCE",
    "WINDOWS_PER_BLOCK",
    "TimelineSegment",
    "align_timeline",
    "check_invariants",
    "final_timeline",
    "fix_line_ranges",
    "parse_model_timeline",
    "repair_timeline",
    "timeline_spans",
]
