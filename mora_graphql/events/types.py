"""Session events: immutable, shareable between subscribers, serialisable for the bus."""

from __future__ import annotations

import datetime as dt
import enum
import json
import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from mora_graphql.models import PipelineStage, SessionStatus


class EventKind(enum.StrEnum):
    STATUS_CHANGED = "STATUS_CHANGED"
    THOUGHT_DELTA = "THOUGHT_DELTA"
    CODE_DELTA = "CODE_DELTA"
    CODE_RESET = "CODE_RESET"
    TIMELINE_READY = "TIMELINE_READY"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


TERMINAL_KINDS = frozenset({EventKind.COMPLETED, EventKind.FAILED, EventKind.CANCELLED})


@dataclass(frozen=True, slots=True)
class SessionEvent:
    session_id: uuid.UUID
    seq: int
    kind: EventKind
    at: dt.datetime
    status: SessionStatus
    stage: PipelineStage | None
    progress: float
    text: str | None = None
    payload: str | None = None
    """JSON text: the timeline for TIMELINE_READY, `{code, message}` for FAILED."""

    @property
    def is_terminal(self) -> bool:
        return self.kind in TERMINAL_KINDS

    def data(self) -> Any:
        return json.loads(self.payload) if self.payload else None

    def to_json(self) -> str:
        return orjson.dumps(
            {
                "sid": str(self.session_id),
                "seq": self.seq,
                "kind": self.kind.value,
                "at": self.at.isoformat(),
                "status": self.status.value,
                "stage": self.stage.value if self.stage else None,
                "progress": self.progress,
                "text": self.text,
                "payload": self.payload,
            }
        ).decode()

    @classmethod
    def from_json(cls, raw: str | bytes) -> SessionEvent:
        data = orjson.loads(raw)
        return cls(
            session_id=uuid.UUID(data["sid"]),
            seq=int(data["seq"]),
            kind=EventKind(data["kind"]),
            at=dt.datetime.fromisoformat(data["at"]),
            status=SessionStatus(data["status"]),
            stage=PipelineStage(data["stage"]) if data["stage"] else None,
            progress=float(data["progress"]),
            text=data.get("text"),
            payload=data.get("payload"),
        )
