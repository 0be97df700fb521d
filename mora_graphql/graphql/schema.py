"""The schema, built once per process with its extensions."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterable, Iterator
from typing import Any, cast

import strawberry
import structlog
from graphql import GraphQLError, GraphQLSyntaxError
from strawberry.exceptions import MissingQueryError
from strawberry.extensions import MaskErrors
from strawberry.schema.config import StrawberryConfig
from strawberry.schema.exceptions import CannotGetOperationTypeError, InvalidOperationTypeError
from strawberry.schema.schema import DEFAULT_ALLOWED_OPERATION_TYPES, StreamResult
from strawberry.types import ExecutionContext, ExecutionResult
from strawberry.types.execution import PreExecutionError
from strawberry.types.graphql import OperationType

from mora_graphql.config import Settings
from mora_graphql.errors import BadRequest, MoraError
from mora_graphql.graphql.context import Context
from mora_graphql.graphql.events import EVENT_TYPES
from mora_graphql.graphql.execution import PlainDataExecutor
from mora_graphql.graphql.inputs import SUBSCRIPTION_TRANSPORTS, unusable_text
from mora_graphql.graphql.limits import (
    Documents,
    QueryLimits,
    parse_error_code,
    strip_suggestions,
)
from mora_graphql.graphql.mutations import Mutation
from mora_graphql.graphql.queries import Query
from mora_graphql.graphql.subscriptions import Subscription
from mora_graphql.logging import redact
from mora_graphql.tracing import graphql_extensions

log = structlog.get_logger("mora.graphql")


CLIENT_ERRORS: dict[type[Exception], str] = {
    MissingQueryError: "GRAPHQL_VALIDATION_FAILED",
    CannotGetOperationTypeError: "GRAPHQL_VALIDATION_FAILED",
    InvalidOperationTypeError: "OPERATION_NOT_ALLOWED",
}


def is_expected(error: GraphQLError) -> bool:
    """Client errors (syntax, validation, our MoraErrors) are shown; everything else is masked."""
    original = error.original_error
    return original is None or isinstance(original, (MoraError, GraphQLError, *CLIENT_ERRORS))


def client_error_code(error: GraphQLError) -> str:
    if isinstance(error, GraphQLSyntaxError):
        return parse_error_code(error)
    original = error.original_error
    if original is not None and type(original) in CLIENT_ERRORS:
        return CLIENT_ERRORS[type(original)]
    return "GRAPHQL_VALIDATION_FAILED"


class MaskUnexpectedErrors(MaskErrors):
    """Shows client errors with their codes (secrets redacted); masks everything else."""

    def __init__(self, *, suggestions: bool = True) -> None:
        super().__init__(should_mask_error=self._mask, error_message="Internal server error.")
        self.suggestions = suggestions

    def _mask(self, error: GraphQLError) -> bool:
        if is_expected(error):
            if error.extensions is None:
                error.extensions = {}
            if "code" not in error.extensions:
                error.extensions["code"] = client_error_code(error)
            message = error.message if self.suggestions else strip_suggestions(error.message)
            error.message = redact(message)
            return False
        log.error("unexpected error", path=error.path, exc_info=error.original_error)
        return True

    def anonymise_error(self, error: GraphQLError) -> GraphQLError:
        masked = super().anonymise_error(error)
        masked.extensions = {"code": "INTERNAL_ERROR", "numericCode": 5001}
        return masked


class MoraExtension(MaskUnexpectedErrors):
    """What every operation needs, in one extension (strawberry wraps the hooks of each
    extension on every request): the query limits, documents parsed and validated once per
    text (`Documents`), and the error masking of `MaskUnexpectedErrors`."""

    def __init__(self, documents: Documents, *, suggestions: bool = True) -> None:
        super().__init__(suggestions=suggestions)
        self.documents = documents
        self._document: Any = None

    def on_operation(self) -> Iterator[None]:
        context = self.execution_context
        limits = self.documents.limits
        context.validation_rules = limits.rules
        cast("dict[str, int]", context.parse_options).update(limits.parse_options)
        yield from super().on_operation()

    def on_parse(self) -> Iterator[None]:
        context = self.execution_context
        if isinstance(context.query, str):
            self._document = self.documents.parse(context.query)
            if self._document is not None:
                context.graphql_document = self._document.document
        yield

    def on_validate(self) -> Iterator[None]:
        context = self.execution_context
        if self._document is not None and context.graphql_document is self._document.document:
            context.pre_execution_errors = self.documents.errors(
                context.schema._schema, self._document
            )
        yield


def _refusal(context: object, error: MoraError) -> list[GraphQLError]:
    """A request error: HTTP 400 with a GraphQL body (the context's sub-response carries
    the status), an `error` message on a WebSocket."""
    if isinstance(context, Context):
        context.refuse_request(400)
    return [GraphQLError(error.message, extensions=error.extensions, original_error=error)]


async def _refused_stream(errors: list[GraphQLError]) -> AsyncGenerator[Any, None]:
    yield PreExecutionError(data=None, errors=errors)


class MoraSchema(strawberry.Schema):
    documents: Documents | None = None
    """The parse and validation cache of its `MoraExtension`."""

    async def execute(
        self,
        query: str | None,
        variable_values: dict[str, Any] | None = None,
        context_value: Any | None = None,
        root_value: Any | None = None,
        operation_name: str | None = None,
        allowed_operation_types: Iterable[OperationType] | None = None,
        operation_extensions: dict[str, Any] | None = None,
    ) -> ExecutionResult:
        """Refuses text that is not Unicode, and a subscription sent as a plain request (it
        would run as a query and resolve to null)."""
        if error := unusable_text(operation_name, variable_values, operation_extensions):
            return ExecutionResult(data=None, errors=_refusal(context_value, error))
        allowed = set(allowed_operation_types or DEFAULT_ALLOWED_OPERATION_TYPES)
        try:
            return await super().execute(
                query,
                variable_values,
                context_value,
                root_value,
                operation_name,
                allowed - {OperationType.SUBSCRIPTION},
                operation_extensions,
            )
        except InvalidOperationTypeError as exc:
            if (
                exc.operation_type is not OperationType.SUBSCRIPTION
                or OperationType.SUBSCRIPTION not in allowed
            ):
                raise
        refused = BadRequest(SUBSCRIPTION_TRANSPORTS, extensions={"operationType": "subscription"})
        return ExecutionResult(data=None, errors=_refusal(context_value, refused))

    async def stream(
        self,
        query: str | None,
        variable_values: dict[str, Any] | None = None,
        context_value: Any | None = None,
        root_value: Any | None = None,
        operation_name: str | None = None,
        operation_extensions: dict[str, Any] | None = None,
        allowed_operation_types: Iterable[OperationType] | None = None,
    ) -> StreamResult:
        if error := unusable_text(operation_name, variable_values, operation_extensions):
            return _refused_stream(_refusal(context_value, error))
        return await super().stream(
            query,
            variable_values,
            context_value,
            root_value,
            operation_name,
            operation_extensions,
            allowed_operation_types,
        )

    def process_errors(
        self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None
    ) -> None:
        """Client errors are not logged (they echo client input); MaskUnexpectedErrors logs
        the unexpected ones."""


def build_schema(settings: Settings) -> strawberry.Schema:
    documents = Documents(QueryLimits.from_settings(settings))
    suggestions = settings.field_suggestions_enabled
    schema = MoraSchema(
        query=Query,
        mutation=Mutation,
        subscription=Subscription,
        types=list(EVENT_TYPES),
        extensions=[
            *graphql_extensions(),
            lambda: MoraExtension(documents, suggestions=suggestions),
        ],
        config=StrawberryConfig(disable_field_suggestions=not suggestions),
        execution_context_class=PlainDataExecutor,
    )
    schema.documents = documents
    return schema
