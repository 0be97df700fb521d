"""Follow one session to its end, across dropped connections and expired tokens."""

from __future__ import annotations

import asyncio
import random
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Protocol

from mora_graphql.terminal.client import (
    AuthError,
    ConnectionLost,
    MoraClient,
    ServerUnavailable,
    TokenExpired,
)
from mora_graphql.terminal.state import (
    SESSION_PROGRESS,
    SESSION_QUERY,
    TERMINAL_EVENTS,
    SessionState,
)


class Observer(Protocol):
    def event(self, event: dict[str, Any], state: SessionState) -> None: ...

    def notice(self, text: str) -> None: ...


@dataclass(frozen=True)
class Backoff:
    """Reconnect delays: `base * 2**n` capped at `cap`, with jitter; give up after `attempts`
    consecutive failures (about two minutes with the defaults)."""

    base: float = 0.5
    cap: float = 10.0
    attempts: int = 15

    def delay(self, failures: int) -> float:
        ceiling = min(self.cap, self.base * 2 ** (failures - 1))
        return float(ceiling / 2 + random.uniform(0, ceiling / 2))


async def follow(
    client: MoraClient,
    session_id: str,
    observer: Observer,
    backoff: Backoff | None = None,
) -> SessionState:
    """Subscribe to `sessionProgress` until a terminal event, then read the stored session.

    A lost connection is resumed with `afterSeq` = the last applied `seq` after a backoff
    delay; an expired token is renewed and the subscription resumed at once. The returned
    state carries the session as stored (its `generatedCode`, timeline and error).
    """
    backoff = backoff or Backoff()
    state = SessionState(session_id)
    failures = 0
    renewals = 0
    while not state.finished:
        try:
            variables = {"id": session_id, "after": state.seq}
            async with aclosing(client.subscribe(SESSION_PROGRESS, variables)) as stream:
                async for data in stream:
                    event = data["sessionProgress"]
                    failures = renewals = 0
                    if state.apply(event):
                        observer.event(event, state)
                    if event["__typename"] in TERMINAL_EVENTS:
                        break
            if not state.finished:
                raise ConnectionLost("the subscription ended before the session did")
        except TokenExpired as exc:
            renewals += 1
            if renewals > 3:
                raise AuthError(f"the server keeps rejecting renewed tokens: {exc}") from exc
            observer.notice("access token expired; renewing it and resuming")
            await client.renew()
        except ConnectionLost as exc:
            failures += 1
            if failures > backoff.attempts:
                raise ServerUnavailable(f"gave up reconnecting: {exc}") from exc
            delay = backoff.delay(failures)
            after = "" if state.seq is None else f" after seq {state.seq}"
            observer.notice(f"{exc}; resuming{after} in {delay:.1f}s")
            await asyncio.sleep(delay)
    stored = (await client.execute(SESSION_QUERY, {"id": session_id}))["session"]
    if stored is not None:
        state.apply_session(stored)
    return state
