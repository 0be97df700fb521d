from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

import strawberry
from graphql import (
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    InlineFragmentNode,
    SelectionSetNode,
)
from sqlalchemy.ext.asyncio import AsyncSession

from mora_graphql.auth.service import AuthService
from mora_graphql.db import Reader, run_read
from mora_graphql.errors import BadUserInput
from mora_graphql.graphql.context import Context, Info
from mora_graphql.graphql.response_cache import list_tag, session_tag, user_tag
from mora_graphql.graphql.types import (
    HEAVY_FIELDS,
    PageInfo,
    Session,
    SessionConnection,
    SessionEdge,
    User,
    decode_cursor,
    encode_cursor,
    user_type,
)
from mora_graphql.models import SessionStatus
from mora_graphql.sessions.repository import SessionRow
from mora_graphql.sessions.service import parse_id

T = TypeVar("T")


async def _read(info: Info, read: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """One read on its own pooled connection (again on a fresh one if that was dead), shielded:
    when a sibling field fails, the executor cancels the others, and a read cancelled
    mid-statement would leave its connection for the garbage collector instead of returning it
    to the pool."""
    return await asyncio.shield(asyncio.ensure_future(run_read(info.context.deps.reads, read)))


async def _select(info: Info, read: Callable[[Reader], Awaitable[T]]) -> T:
    """A read through the context's `Reader` (which keeps its pool sound when cancelled)."""
    return await read(info.context.deps.reader)


async def find_session(context: Context, session_id: str) -> SessionRow | None:
    """`session(id)`'s read, shared with its compiled form (`graphql/hot.py`): the caller's
    session or None; raises without a valid token. Records what the response cache needs."""
    service = context.session_service()
    recorder = context.recorder
    if recorder is not None:
        ident = parse_id(session_id)
        if ident is None:
            recorder.forbid()
        else:
            await recorder.depend(session_tag(ident))
    row = await service.find(context.deps.reader, session_id)
    if recorder is not None:
        recorder.saw(row.status if row else None)
    return row


def _field_names(
    selection_set: SelectionSetNode | None,
    path: tuple[str, ...],
    fragments: Mapping[str, FragmentDefinitionNode],
) -> set[str] | None:
    """Names selected at `path` below this selection set (fragments included, `@skip` and
    `@include` not applied); None when something cannot be analysed, meaning "assume
    everything"."""
    found: set[str] = set()
    if selection_set is None:
        return found
    for selection in selection_set.selections:
        if isinstance(selection, FieldNode):
            if not path:
                found.add(selection.name.value)
                continue
            if selection.name.value != path[0]:
                continue
            inner = _field_names(selection.selection_set, path[1:], fragments)
        elif isinstance(selection, InlineFragmentNode):
            inner = _field_names(selection.selection_set, path, fragments)
        elif isinstance(selection, FragmentSpreadNode):
            fragment = fragments.get(selection.name.value)
            if fragment is None:
                return None
            inner = _field_names(fragment.selection_set, path, fragments)
        else:
            return None
        if inner is None:
            return None
        found |= inner
    return found


def _unselected_heavy_columns(info: Info) -> list[str]:
    """Large columns of `sessions { edges { node } nodes }` the query does not ask for (read
    from the document: strawberry's `selected_fields` converts every node and argument)."""
    raw = info._raw_info
    wanted: set[str] = set()
    for node in raw.field_nodes:  # `sessions` may be selected more than once
        for path in (("edges", "node"), ("nodes",)):
            names = _field_names(node.selection_set, path, raw.fragments)
            if names is None:
                return []
            wanted |= names
    return [column for field, column in HEAVY_FIELDS.items() if field not in wanted]


@strawberry.type
class Query:
    @strawberry.field(description="Null when the session does not exist or is not yours.")
    async def session(self, info: Info, id: strawberry.ID) -> Session | None:
        row = await find_session(info.context, id)
        return Session.of(row) if row else None

    @strawberry.field(description="Your sessions, newest first.")
    async def sessions(
        self,
        info: Info,
        first: int = 20,
        after: str | None = None,
        status: SessionStatus | None = None,
    ) -> SessionConnection:
        service = info.context.session_service()
        cursor = None
        if after is not None:
            try:
                cursor = decode_cursor(after)
            except ValueError as exc:
                raise BadUserInput(
                    "after is not a valid cursor.", extensions={"field": "after"}
                ) from exc
        recorder = info.context.recorder
        if recorder is not None:
            if status is None:
                principal = service.principal
                await recorder.depend(list_tag(None if principal.is_admin else principal.user_id))
            else:
                recorder.forbid()
        skip = _unselected_heavy_columns(info)
        rows, has_next = await _select(
            info,
            lambda reader: service.page(
                reader, first=first, after=cursor, status=status, skip_columns=skip
            ),
        )
        if recorder is not None:
            for row in rows:
                recorder.saw(row.status)
        edges = [SessionEdge(cursor=encode_cursor(row), node=Session.of(row)) for row in rows]
        return SessionConnection(
            edges=edges,
            page_info=PageInfo(
                has_next_page=has_next, end_cursor=edges[-1].cursor if edges else None
            ),
        )

    @strawberry.field(description="The signed-in user; null without a token.")
    async def me(self, info: Info) -> User | None:
        principal = info.context.principal()
        if principal is None:
            return None
        recorder = info.context.recorder
        if recorder is not None:
            await recorder.depend(user_tag(principal.user_id))
        settings = info.context.deps.settings
        user = await _read(info, lambda db: AuthService(db, settings).current_user(principal))
        if recorder is not None and user is None:
            recorder.forbid()
        return user_type(user) if user else None
