"""The job queue interface shared by the in-process runner and procrastinate, and the job."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Protocol

from mora_graphql.pipeline.run import RunOutcome

RunSession = Callable[[uuid.UUID, Callable[[], bool]], Awaitable[RunOutcome | None]]
"""The one job: run the pipeline for a session. The second argument, `stopping()`, tells a
process shutdown (leave the session to be resumed) from a user cancel. The queue acts on the
outcome: it queues the sessions to wake, and queues a parked session again later."""


class JobQueue(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def enqueue(self, session_id: uuid.UUID) -> None:
        """Schedule one pipeline run; a session already queued or running is not queued twice.
        May raise (the queue is unreachable): the unfinished row still owes its run, and the
        reconciler queues it later (`jobs.reconcile`)."""
        ...

    async def cancel(self, session_id: uuid.UUID) -> bool:
        """Drop the session's queued job and ask a running one to stop, waiting a little for
        it to end the session. True when a run held the session (it ends the session itself,
        perhaps later), False when none did (the caller ends the session)."""
        ...

    async def orphans(self, *, older_than: float) -> list[uuid.UUID]:
        """Unfinished sessions not updated for `older_than` seconds that have no queued,
        retrying or running job: each still owes a run that nothing will start."""
        ...
