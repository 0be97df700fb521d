"""The pipeline job (placeholder until the stages land)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mora_graphql.app import Services


class PipelineRunner:
    def __init__(self, services: Services, *, shutting_down: Callable[[], bool]) -> None:
        self.services = services
        self.shutting_down = shutting_down

    async def run(self, session_id: uuid.UUID) -> None:
        return None

    async def resume_unfinished(self) -> None:
        return None
