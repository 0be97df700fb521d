"""Rebuilding a session from events: duplicates, resets, snapshots."""

from __future__ import annotations

from typing import Any

from mora_graphql.terminal.client import graphql_endpoints
from mora_graphql.terminal.state import SessionState


def event(kind: str, seq: int, **fields: Any) -> dict[str, Any]:
    return {
        "__typename": kind,
        "seq": seq,
        "status": "PROCESSING",
        "stage": None,
        "progress": fields.pop("progress", 0.5),
        **fields,
    }


def session(code: str | None, status: str = "PROCESSING") -> dict[str, Any]:
    return {
        "status": status,
        "stage": "GENERATING_CODE",
        "generatedCode": code,
        "language": "python",
        "videoInfo": None,
        "timeline": None,
        "error": None,
    }


def test_deltas_resets_and_duplicates() -> None:
    state = SessionState("s")
    assert state.apply(event("SessionSnapshot", 4, session=session("a = 1\n")))
    assert state.apply(event("CodeDelta", 5, text="b = 2\n"))
    assert not state.apply(event("CodeDelta", 5, text="b = 2\n"))
    assert state.code == "a = 1\nb = 2\n"
    assert state.apply(event("ThoughtDelta", 6, text="hmm"))
    assert state.apply(event("CodeReset", 7))
    assert (state.code, state.thoughts, state.resets) == ("", "", 1)
    assert state.apply(event("CodeDelta", 8, text="c = 3\n"))
    assert state.code == "c = 3\n" and state.seqs == [4, 5, 6, 7, 8]


def test_a_snapshot_replaces_what_was_rebuilt() -> None:
    state = SessionState("s")
    state.apply(event("SessionSnapshot", 1, session=session(None)))
    state.apply(event("CodeDelta", 2, text="partial"))
    state.apply(event("SessionSnapshot", 9, session=session("x = 1\n")))
    assert state.code == "x = 1\n" and state.seq == 9
    done = event("SessionCompleted", 10, session=session("x = 1\ny = 2\n", "COMPLETED"))
    done["status"] = "COMPLETED"
    state.apply(done)
    assert state.finished and state.code == "x = 1\ny = 2\n" and state.progress == 1.0


def test_endpoints() -> None:
    assert graphql_endpoints("http://h:8000") == ("http://h:8000/graphql", "ws://h:8000/graphql")
    assert graphql_endpoints("https://h/graphql/") == ("https://h/graphql", "wss://h/graphql")
