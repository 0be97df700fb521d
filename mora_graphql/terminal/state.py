"""The session as a client rebuilds it from `sessionProgress` events."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TERMINAL_STATUSES = frozenset({"COMPLETED", "ERROR", "CANCELLED"})
TERMINAL_EVENTS = frozenset({"SessionCompleted", "SessionFailed", "SessionCancelled"})

SESSION_FIELDS = """
  id videoUrl language status stage progress lastSeq generatedCode fromCache
  videoInfo { title duration author }
  timeline { source segments { startTime endTime description codeLines startLine endLine } }
  error { code numericCode message }
"""
SESSION_PROGRESS = f"""
subscription($id: ID!, $after: Int) {{
  sessionProgress(sessionId: $id, afterSeq: $after) {{
    __typename seq sessionId at status stage progress
    ... on SessionSnapshot {{ session {{ {SESSION_FIELDS} }} }}
    ... on CodeDelta {{ text }}
    ... on ThoughtDelta {{ text }}
    ... on TimelineReady {{
      timeline {{ source segments {{ startTime endTime description codeLines startLine endLine }} }}
    }}
    ... on SessionCompleted {{ session {{ {SESSION_FIELDS} }} }}
    ... on SessionFailed {{ error {{ code numericCode message }} }}
  }}
}}"""
SESSION_QUERY = f"query($id: ID!) {{ session(id: $id) {{ {SESSION_FIELDS} }} }}"


@dataclass
class SessionState:
    """What the subscriber knows after the events it has applied, in `seq` order.

    `code` is the code as it is being written: the snapshot's (checkpointed) code plus
    every `CodeDelta` since, emptied by `CodeReset` (the pipeline restarted the stream);
    `SessionCompleted` replaces it with the stored code.
    """

    session_id: str
    seq: int | None = None
    status: str = "CREATED"
    stage: str | None = None
    progress: float = 0.0
    code: str = ""
    thoughts: str = ""
    language: str = "python"
    title: str | None = None
    timeline: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    resets: int = 0
    seqs: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def apply(self, event: dict[str, Any]) -> bool:
        """Apply one event; False (and no change) for one already applied."""
        kind = event["__typename"]
        seq = int(event["seq"])
        if kind != "SessionSnapshot" and self.seq is not None and seq <= self.seq:
            return False
        self.seq = seq
        self.seqs.append(seq)
        self.status = event["status"]
        self.stage = event.get("stage")
        self.progress = max(self.progress, float(event["progress"]))
        if kind == "SessionSnapshot":
            self.progress = float(event["progress"])
            self.apply_session(event["session"])
        elif kind == "CodeDelta":
            self.code += event["text"]
        elif kind == "ThoughtDelta":
            self.thoughts += event["text"]
        elif kind == "CodeReset":
            self.code = ""
            self.thoughts = ""
            self.resets += 1
        elif kind == "TimelineReady":
            self.timeline = event["timeline"]
        elif kind == "SessionCompleted":
            self.apply_session(event["session"])
        elif kind == "SessionFailed":
            self.error = event["error"]
        return True

    def apply_session(self, session: dict[str, Any]) -> None:
        """Take the state of a whole `Session` object (snapshot or final read)."""
        self.status = session["status"]
        self.stage = session.get("stage")
        self.code = session.get("generatedCode") or ""
        self.language = session.get("language") or self.language
        self.title = (session.get("videoInfo") or {}).get("title") or self.title
        self.timeline = session.get("timeline") or self.timeline
        self.error = session.get("error") or self.error
        if self.status == "COMPLETED":
            self.progress = 1.0
