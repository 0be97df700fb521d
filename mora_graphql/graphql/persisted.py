"""Automatic persisted queries, Apollo's protocol, on HTTP (POST and GET) and both WebSocket
protocols.

A request carries `extensions.persistedQuery = {version: 1, sha256Hash}`. Without `query`, the
document registered under that hash runs, or the answer is `PersistedQueryNotFound`
(extensions.code `PERSISTED_QUERY_NOT_FOUND`) and the client sends the document with the hash;
it is stored once SHA-256 of the document matches the hash. GET is accepted for persisted
queries only (and, as always over GET, for queries only).

Modes (`PERSISTED_QUERIES`): `auto` (clients register documents), `allowlist` (only the
documents of `PERSISTED_QUERIES_ALLOWLIST` run, by hash or in full), `off`.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

import orjson
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.responses import Response
from strawberry.http import GraphQLRequestData

from mora_graphql.config import Settings
from mora_graphql.metrics import PERSISTED_QUERY_LOOKUPS

log = structlog.get_logger("mora.persisted")

VERSION = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")
NOT_FOUND = "PersistedQueryNotFound"
NOT_SUPPORTED = "PersistedQueryNotSupported"
MISMATCH = "provided sha does not match query"
REDIS_TTL = 7 * 86_400


def sha256_hex(document: str) -> str:
    return hashlib.sha256(document.encode("utf-8", "surrogatepass")).hexdigest()


class PersistedQueryError(Exception):
    """Refused before execution; `status` is the HTTP status, the body a GraphQL error."""

    def __init__(self, message: str, code: str, status: int = 200) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status

    @property
    def formatted(self) -> dict[str, Any]:
        return {"message": self.message, "extensions": {"code": self.code}}

    def response(self) -> Response:
        headers = {"cache-control": "private, no-cache, must-revalidate"}
        if self.status == 405:
            headers["allow"] = "POST"
        return Response(
            orjson.dumps({"errors": [self.formatted]}),
            status_code=self.status,
            media_type="application/json",
            headers=headers,
        )


class QueryStore(Protocol):
    async def get(self, sha: str) -> str | None: ...

    async def put(self, sha: str, document: str) -> None: ...


class MemoryQueryStore:
    """Least recently used documents of one process, at most `max_entries`."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._documents: OrderedDict[str, str] = OrderedDict()

    async def get(self, sha: str) -> str | None:
        document = self._documents.get(sha)
        if document is not None:
            self._documents.move_to_end(sha)
        return document

    async def put(self, sha: str, document: str) -> None:
        self._documents[sha] = document
        self._documents.move_to_end(sha)
        while len(self._documents) > self.max_entries:
            self._documents.popitem(last=False)


class RedisQueryStore:
    """Shared by every process; each document expires a week after it was last registered.
    Redis errors degrade to "not found" (the client then sends the document)."""

    def __init__(self, redis: Redis, prefix: str = "mora:apq:") -> None:
        self.redis = redis
        self.prefix = prefix

    async def get(self, sha: str) -> str | None:
        try:
            value = await self.redis.get(self.prefix + sha)
        except RedisError as exc:
            log.warning("persisted queries unavailable", op="get", error=type(exc).__name__)
            return None
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    async def put(self, sha: str, document: str) -> None:
        try:
            await self.redis.set(self.prefix + sha, document, ex=REDIS_TTL)
        except RedisError as exc:
            log.warning("persisted queries unavailable", op="put", error=type(exc).__name__)


def load_allowlist(path: str) -> dict[str, str]:
    """Hash -> document from a directory of `.graphql` files (each file one document) or an
    Apollo persisted-query manifest (`{"operations": [{"id", "body"}, ...]}`) or a JSON object
    mapping hashes to documents. Every hash is checked against its document."""
    source = Path(path)
    documents: list[str] = []
    if source.is_dir():
        documents = [file.read_text() for file in sorted(source.rglob("*.graphql"))]
    else:
        data = orjson.loads(source.read_bytes())
        if isinstance(data, dict) and isinstance(data.get("operations"), list):
            documents = [str(operation["body"]) for operation in data["operations"]]
        elif isinstance(data, dict):
            documents = [str(body) for body in data.values()]
        else:
            raise ValueError(f"{path}: not a persisted-query manifest")
    return {sha256_hex(document): document for document in documents}


class PersistedQueries:
    def __init__(
        self, mode: str, store: QueryStore, allowlist: dict[str, str] | None = None
    ) -> None:
        self.mode = mode
        self.store = store
        self.allowlist = allowlist or {}

    @classmethod
    def build(cls, settings: Settings, redis: Redis | None) -> PersistedQueries:
        store: QueryStore = (
            RedisQueryStore(redis)
            if redis is not None
            else MemoryQueryStore(settings.persisted_queries_max_entries)
        )
        allowlist = (
            load_allowlist(settings.persisted_queries_allowlist)
            if settings.persisted_queries_allowlist
            else {}
        )
        if settings.persisted_queries == "allowlist" and not allowlist:
            log.warning("PERSISTED_QUERIES=allowlist with an empty allow-list: nothing can run")
        return cls(settings.persisted_queries, store, allowlist)

    async def document(self, query: object, extensions: object) -> str | None:
        """The document to run for this request, or PersistedQueryError."""
        persisted = extensions.get("persistedQuery") if isinstance(extensions, dict) else None
        if persisted is None:
            if self.mode == "allowlist" and (
                not isinstance(query, str) or sha256_hex(query) not in self.allowlist
            ):
                raise PersistedQueryError(
                    "This server runs only the documents of its allow-list.",
                    "PERSISTED_QUERY_NOT_IN_LIST",
                    400,
                )
            return query if isinstance(query, str) else None
        if self.mode == "off":
            PERSISTED_QUERY_LOOKUPS.labels("unsupported").inc()
            raise PersistedQueryError(NOT_SUPPORTED, "PERSISTED_QUERY_NOT_SUPPORTED")
        if not isinstance(persisted, dict) or persisted.get("version") != VERSION:
            raise PersistedQueryError("Unsupported persisted query version", "BAD_REQUEST", 400)
        sha = persisted.get("sha256Hash")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise PersistedQueryError(
                "persistedQuery.sha256Hash must be 64 lowercase hex digits", "BAD_REQUEST", 400
            )
        if query is None:
            document = self.allowlist.get(sha)
            if document is None and self.mode == "auto":
                document = await self.store.get(sha)
            if document is None:
                PERSISTED_QUERY_LOOKUPS.labels("not_found").inc()
                raise PersistedQueryError(NOT_FOUND, "PERSISTED_QUERY_NOT_FOUND")
            PERSISTED_QUERY_LOOKUPS.labels("hit").inc()
            return document
        if not isinstance(query, str) or sha256_hex(query) != sha:
            raise PersistedQueryError(MISMATCH, "BAD_REQUEST", 400)
        if sha in self.allowlist:
            return query
        if self.mode == "allowlist":
            raise PersistedQueryError(
                "This server runs only the documents of its allow-list.",
                "PERSISTED_QUERY_NOT_IN_LIST",
                400,
            )
        PERSISTED_QUERY_LOOKUPS.labels("registered").inc()
        await self.store.put(sha, query)
        return query

    async def http_request(self, data: GraphQLRequestData, method: str) -> GraphQLRequestData:
        """Fills `data.query` in; over GET only persisted queries are accepted."""
        if method == "GET" and not (
            isinstance(data.extensions, dict) and "persistedQuery" in data.extensions
        ):
            raise PersistedQueryError(
                "GET is accepted only for persisted queries; send the document with POST.",
                "METHOD_NOT_ALLOWED",
                405,
            )
        data.query = await self.document(data.query, data.extensions)
        return data

    async def ws_payload(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        """For a `subscribe`/`start` payload: fills `payload["query"]` in and returns None, or
        returns the formatted error to send for this operation."""
        try:
            payload["query"] = await self.document(payload.get("query"), payload.get("extensions"))
        except PersistedQueryError as exc:
            return exc.formatted
        return None


def is_persisted_payload(payload: dict[str, Any]) -> bool:
    """A WebSocket payload that may come without `query` (a hash instead)."""
    extensions = payload.get("extensions")
    return isinstance(extensions, dict) and isinstance(extensions.get("persistedQuery"), dict)
