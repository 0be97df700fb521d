"""The schema, built once per process with its extensions."""

from __future__ import annotations

from collections.abc import Iterator

import strawberry
import structlog
from graphql import GraphQLError
from strawberry.extensions import MaskErrors, ParserCache, ValidationCache
from strawberry.schema.config import StrawberryConfig

from mora_graphql.config import Settings
from mora_graphql.errors import MoraError
from mora_graphql.graphql.events import EVENT_TYPES
from mora_graphql.graphql.mutations import Mutation
from mora_graphql.graphql.queries import Query
from mora_graphql.graphql.subscriptions import Subscription

log = structlog.get_logger("mora.graphql")


def is_expected(error: GraphQLError) -> bool:
    """Client errors (syntax, validation, our MoraErrors) are shown; everything else is masked."""
    original = error.original_error
    return original is None or isinstance(original, MoraError)


class MaskUnexpectedErrors(MaskErrors):
    def __init__(self) -> None:
        super().__init__(should_mask_error=self._mask, error_message="Internal server error.")

    @staticmethod
    def _mask(error: GraphQLError) -> bool:
        if is_expected(error):
            if (
                error.original_error is None
                and error.extensions is not None
                and "code" not in error.extensions
            ):
                error.extensions["code"] = "GRAPHQL_VALIDATION_FAILED"
            return False
        log.error("unexpected error", path=error.path, exc_info=error.original_error)
        return True

    def anonymise_error(self, error: GraphQLError) -> GraphQLError:
        masked = super().anonymise_error(error)
        masked.extensions = {"code": "INTERNAL_ERROR", "numericCode": 5001}
        return masked

    def on_operation(self) -> Iterator[None]:
        yield from super().on_operation()


def build_schema(settings: Settings) -> strawberry.Schema:
    return strawberry.Schema(
        query=Query,
        mutation=Mutation,
        subscription=Subscription,
        types=list(EVENT_TYPES),
        extensions=[
            lambda: ParserCache(maxsize=1024),
            lambda: ValidationCache(maxsize=1024),
            MaskUnexpectedErrors,
        ],
        config=StrawberryConfig(disable_field_suggestions=settings.is_production),
    )
