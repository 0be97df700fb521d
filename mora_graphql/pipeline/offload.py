"""The CPU-bound steps of runs (code checks, timeline prompts and alignment) off the event loop.

They run in one separate process. `ast.parse` holds the GIL for the whole parse (4 ms for 500
lines), so on a thread of the process the loop streaming the other sessions' tokens stopped
for as long: when 200 runs of a worker ended together their checks alone held it up for most
of a second, and the last tokens of every run waited behind them (distributed bench). In a
process they use the other core, and the steps of runs ending together queue there. The steps
are plain functions of plain data (no logging, no spans), so nothing of the run's context is
lost on the way.
"""

from __future__ import annotations

from mora_graphql.processes import ProcessLane

RUN_CPU = ProcessLane(1)
off_loop = RUN_CPU.run
"""`await off_loop(fn, *args, **kwargs)`: `fn` in the runs' CPU process."""
RUN_CPU_MODULES = ("mora_graphql.pipeline.code", "mora_graphql.pipeline.stages.timeline")
"""What the steps sent to `off_loop` import: loaded when a process that runs jobs starts."""


def start_run_cpu() -> None:
    RUN_CPU.start(*RUN_CPU_MODULES)
