"""Compiled `session(id)` queries: the response written from the row, without an operation.

A client polling one session sends the same document again and again. Executing it costs far
more than reading the row: Strawberry's view and operation set-up (extensions, execution
context, result processing), graphql-core's executor, then the response encoding. For a
document whose only root field is `session(id: $var)` (or a string literal), with a selection
that `PlainDataExecutor` completes without graphql-core (plain-data fields, no variables in
directives), the first request compiles once per (document, operation name):

- the response name and where `id` comes from (an `ID!` variable or a literal),
- the completion of the selection below `session`, the same plan `PlainDataExecutor` makes.

A later POST of the same text (JSON body with `query`, `variables`, `operationName` only) runs
`Query.session`'s own read (`queries.find_session`: token, visibility, response-cache
recording) and completes the row with the plan; the body is `{"data": {name: value}}`, encoded
as the normal path encodes it. Anything else takes the normal path from the start, which then
answers exactly as before: an `id` variable that is not a string, lone surrogates, any error
(no or bad token, a failed read) and any value the plan does not complete directly (a null in a
non-null field, a value its type must coerce or reject). The fallback may read the row again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from graphql import (
    FieldNode,
    GraphQLSchema,
    NamedTypeNode,
    NonNullTypeNode,
    OperationDefinitionNode,
    OperationType,
    StringValueNode,
    VariableNode,
)
from graphql.execution.collect_fields import FieldDetails
from strawberry.types.field import StrawberryField

from mora_graphql.graphql.execution import (
    PlainDataExecutor,
    Spec,
    only_root_field,
    response_name,
)
from mora_graphql.graphql.limits import Documents
from mora_graphql.graphql.queries import Query

CACHE_SIZE = 256
_DEFINITION = "strawberry-definition"


@dataclass(frozen=True, slots=True)
class HotOperation:
    response_name: str
    variable: str | None
    """The variable holding `id` (declared `ID!`); None when `literal` is the id."""
    literal: str | None
    spec: Spec
    """Completes a `Session` (or None) into the response value of `session`."""

    def session_id(self, variables: Mapping[str, Any] | None) -> str | None:
        """The id of this request, None when only the normal path can tell (missing, not a
        string: coercion and its errors are graphql-core's)."""
        if self.variable is None:
            return self.literal
        if variables is None:
            return None
        value = variables.get(self.variable)
        return value if type(value) is str else None


class _NotNow:
    """The document could not be compiled with this request's variables (they failed
    coercion, or name an absent operation): try again with the next request."""


NOT_NOW = _NotNow()


class HotOperations:
    """The compiled operations of one schema, per (document text, operation name), LRU."""

    def __init__(self, schema: GraphQLSchema, documents: Documents, size: int = CACHE_SIZE) -> None:
        self.schema = schema
        self.documents = documents
        self.size = size
        self._entries: OrderedDict[tuple[str, str | None], HotOperation | None] = OrderedDict()
        self.served = 0
        """Requests answered by a compiled operation (tests, benchmarks)."""

    def get(
        self, query: str, operation_name: str | None, variables: dict[str, Any] | None
    ) -> HotOperation | None:
        key = (query, operation_name)
        entries = self._entries
        if key in entries:
            entries.move_to_end(key)
            return entries[key]
        compiled = self._compile(query, operation_name, variables)
        if isinstance(compiled, _NotNow):
            return None
        entries[key] = compiled
        while len(entries) > self.size:
            entries.popitem(last=False)
        return compiled

    def _compile(
        self, query: str, operation_name: str | None, variables: dict[str, Any] | None
    ) -> HotOperation | _NotNow | None:
        entry = self.documents.parse(query)
        if entry is None or self.documents.errors(self.schema, entry):
            return None
        executor = PlainDataExecutor.build(
            self.schema,
            entry.document,
            raw_variable_values=variables,
            operation_name=operation_name,
        )
        if not isinstance(executor, PlainDataExecutor):
            return NOT_NOW
        if not executor.plans_shared:
            return None  # directives take variables: field sets differ between requests
        operation = executor.operation
        field = _root_session_field(operation)
        query_type = self.schema.query_type
        if field is None or query_type is None:
            return None
        field_def = query_type.fields.get("session")
        if field_def is None or not _is_session_resolver(field_def.extensions.get(_DEFINITION)):
            return None
        argument = (field.arguments or ())[0].value
        variable: str | None = None
        literal: str | None = None
        if isinstance(argument, VariableNode):
            variable = argument.name.value
            if not _id_variable(operation, variable):
                return None
        elif isinstance(argument, StringValueNode):
            literal = argument.value
        else:
            return None
        spec = executor.type_plan(field_def.type, [FieldDetails(field, None)])
        if spec is None:
            return None
        return HotOperation(response_name(field), variable, literal, spec)


def _root_session_field(operation: OperationDefinitionNode) -> FieldNode | None:
    """The query's only root selection when it is `session(id: ...)` without directives."""
    field = only_root_field(operation, OperationType.QUERY, "session")
    arguments = (field.arguments or ()) if field is not None else ()
    if len(arguments) != 1 or arguments[0].name.value != "id":
        return None
    return field


def _id_variable(operation: OperationDefinitionNode, name: str) -> bool:
    """`name` is declared `ID!` without a default (a null or a default is graphql-core's)."""
    for definition in operation.variable_definitions or ():
        if definition.variable.name.value != name:
            continue
        kind = definition.type
        return (
            definition.default_value is None
            and not definition.directives
            and isinstance(kind, NonNullTypeNode)
            and isinstance(kind.type, NamedTypeNode)
            and kind.type.name.value == "ID"
        )
    return False


def _is_session_resolver(definition: object) -> bool:
    """The field is `Query.session` itself, whose read `find_session` is."""
    if not isinstance(definition, StrawberryField) or definition.base_resolver is None:
        return False
    ours = Query.__strawberry_definition__.get_field("session")  # type: ignore[attr-defined]
    return (
        ours is not None
        and ours.base_resolver is not None
        and definition.base_resolver.wrapped_func is ours.base_resolver.wrapped_func
        and not definition.extensions
    )
