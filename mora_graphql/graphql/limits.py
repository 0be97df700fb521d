"""Document limits: depth, aliases, directives, tokens, length, introspection.

`QueryLimits` is built once per schema, and `Documents` parses and validates each query text
once with its parse options and rules. Fragments are measured once each, so a document that
spreads fragments into each other many times costs linear, not exponential, work
(strawberry's own `QueryDepthLimiter` and `MaxAliasesLimiter` re-walk every spread).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from graphql import (
    ASTValidationRule,
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLSchema,
    GraphQLSyntaxError,
    InlineFragmentNode,
    OperationDefinitionNode,
    SelectionSetNode,
    ValidationContext,
    ValidationRule,
    parse,
    specified_rules,
)
from graphql.language import SKIP, VisitorAction
from strawberry.schema.schema import validate_document

from mora_graphql.config import Settings

CACHE_SIZE = 256
INTROSPECTION_FIELDS = frozenset({"__schema", "__type"})
_PARSE_LIMITS = (
    (re.compile(r"contains more than \d+ (tokens|comments)"), "TOO_MANY_TOKENS"),
    (re.compile(r"contains more than \d+ code points"), "DOCUMENT_TOO_LARGE"),
)
_SUGGESTION = re.compile(r"\s*Did you mean .*$", re.DOTALL)


def _limit_error(message: str, node: Any, code: str, limit: int) -> GraphQLError:
    return GraphQLError(message, [node], extensions={"code": code, "limit": limit})


def parse_error_code(error: GraphQLSyntaxError) -> str:
    for pattern, code in _PARSE_LIMITS:
        if pattern.search(error.message):
            return code
    return "GRAPHQL_PARSE_FAILED"


def strip_suggestions(message: str) -> str:
    return _SUGGESTION.sub("", message)


class _Walker:
    """Measures the selection sets of one document, each fragment at most once."""

    def __init__(self, context: ValidationContext, cap: int) -> None:
        self.context = context
        self.cap = cap
        self._memo: dict[str, int] = {}
        self._active: set[str] = set()

    def fragment(self, name: str, measure: Callable[[FragmentDefinitionNode], int]) -> int:
        if name in self._memo:
            return self._memo[name]
        fragment = self.context.get_fragment(name)
        if fragment is None or name in self._active:
            return 0
        self._active.add(name)
        try:
            self._memo[name] = min(measure(fragment), self.cap)
        finally:
            self._active.discard(name)
        return self._memo[name]


class _DepthWalker(_Walker):
    """Depth = fields on the longest path; inline fragments and spreads add no level."""

    def depth(self, selection_set: SelectionSetNode | None, level: int = 0) -> int:
        if selection_set is None or level > self.cap:
            return 0
        deepest = 0
        for selection in selection_set.selections:
            if isinstance(selection, FieldNode):
                if selection.name.value not in INTROSPECTION_FIELDS:
                    deepest = max(deepest, 1 + self.depth(selection.selection_set, level + 1))
            elif isinstance(selection, InlineFragmentNode):
                deepest = max(deepest, self.depth(selection.selection_set, level))
            elif isinstance(selection, FragmentSpreadNode):
                deepest = max(
                    deepest,
                    self.fragment(selection.name.value, lambda f: self.depth(f.selection_set)),
                )
            if deepest > self.cap:
                break
        return min(deepest, self.cap)


class _CountWalker(_Walker):
    """Counts aliases, or directives, with every fragment spread expanded."""

    def __init__(self, context: ValidationContext, cap: int, *, aliases: bool) -> None:
        super().__init__(context, cap)
        self.aliases = aliases

    def count(self, selection_set: SelectionSetNode | None) -> int:
        if selection_set is None:
            return 0
        total = 0
        for selection in selection_set.selections:
            if self.aliases:
                total += 1 if isinstance(selection, FieldNode) and selection.alias else 0
            else:
                total += len(selection.directives or ())
            if isinstance(selection, FieldNode | InlineFragmentNode):
                total += self.count(selection.selection_set)
            elif isinstance(selection, FragmentSpreadNode):
                total += self.fragment(selection.name.value, self._fragment)
            if total > self.cap:
                return self.cap
        return total

    def _fragment(self, fragment: FragmentDefinitionNode) -> int:
        own = 0 if self.aliases else len(fragment.directives or ())
        return own + self.count(fragment.selection_set)


def max_depth_rule(limit: int) -> type[ASTValidationRule]:
    class MaxDepthRule(ValidationRule):
        def __init__(self, context: ValidationContext) -> None:
            super().__init__(context)
            self.walker = _DepthWalker(context, limit + 1)

        def enter_operation_definition(
            self, node: OperationDefinitionNode, *_args: Any
        ) -> VisitorAction:
            depth = self.walker.depth(node.selection_set)
            if depth > limit:
                self.report_error(
                    _limit_error(
                        f"The operation is nested more than {limit} levels deep.",
                        node,
                        "QUERY_TOO_DEEP",
                        limit,
                    )
                )
            return SKIP

    return MaxDepthRule


def max_count_rule(limit: int, *, aliases: bool) -> type[ASTValidationRule]:
    what, code = (
        ("aliases", "TOO_MANY_ALIASES") if aliases else ("directives", "TOO_MANY_DIRECTIVES")
    )

    class MaxCountRule(ValidationRule):
        def __init__(self, context: ValidationContext) -> None:
            super().__init__(context)
            self.walker = _CountWalker(context, limit + 1, aliases=aliases)

        def enter_operation_definition(
            self, node: OperationDefinitionNode, *_args: Any
        ) -> VisitorAction:
            total = self.walker.count(node.selection_set)
            if not aliases:
                total += len(node.directives or ())
                total += sum(len(v.directives or ()) for v in node.variable_definitions or ())
            if total > limit:
                self.report_error(
                    _limit_error(f"The operation uses more than {limit} {what}.", node, code, limit)
                )
            return SKIP

    MaxCountRule.__name__ = f"Max{what.title()}Rule"
    return MaxCountRule


class NoIntrospectionRule(ValidationRule):
    def enter_field(self, node: FieldNode, *_args: Any) -> VisitorAction:
        if node.name.value in INTROSPECTION_FIELDS:
            self.report_error(
                GraphQLError(
                    "Introspection is disabled on this server.",
                    [node],
                    extensions={"code": "INTROSPECTION_DISABLED"},
                )
            )
            return SKIP
        return None


@dataclass(frozen=True, slots=True)
class QueryLimits:
    rules: tuple[type[ASTValidationRule], ...]
    parse_options: dict[str, int]

    @classmethod
    def from_settings(cls, settings: Settings) -> QueryLimits:
        rules: list[type[ASTValidationRule]] = [
            *specified_rules,
            max_depth_rule(settings.graphql_max_depth),
            max_count_rule(settings.graphql_max_aliases, aliases=True),
            max_count_rule(settings.graphql_max_directives, aliases=False),
        ]
        if not settings.introspection_enabled:
            rules.append(NoIntrospectionRule)
        return cls(
            rules=tuple(rules),
            parse_options={
                "max_lexical_tokens": settings.graphql_max_tokens,
                "max_comments": settings.graphql_max_tokens,
                "max_source_length": settings.graphql_max_document_length,
            },
        )


class Documents:
    """Documents parsed and validated once per query text (LRU of `CACHE_SIZE` texts), with
    the limits' parse options and rules.

    Validation is kept with the parsed document it belongs to: strawberry's `ValidationCache`
    finds it by a hash of the whole document tree, recomputed on every request. A text that
    does not parse is not kept: strawberry's own parse step then reports the error through the
    normal error path (masking, codes, the WebSocket protocols)."""

    def __init__(self, limits: QueryLimits, size: int = CACHE_SIZE) -> None:
        self.limits = limits
        self.size = size
        self._entries: OrderedDict[str, _Document] = OrderedDict()
        self.validations = 0
        """Documents validated so far (tests)."""

    def parse(self, query: str) -> _Document | None:
        entries = self._entries
        entry = entries.get(query)
        if entry is not None:
            entries.move_to_end(query)
            return entry
        try:
            document = parse(query, **self.limits.parse_options)  # type: ignore[arg-type]
        except GraphQLError:
            return None
        entry = entries[query] = _Document(document)
        if len(entries) > self.size:
            entries.popitem(last=False)
        return entry

    def errors(self, schema: GraphQLSchema, entry: _Document) -> list[GraphQLError]:
        if entry.errors is None or entry.schema is not schema:
            self.validations += 1
            entry.errors = validate_document(schema, entry.document, self.limits.rules)
            entry.schema = schema
        return entry.errors


@dataclass(slots=True)
class _Document:
    document: DocumentNode
    errors: list[GraphQLError] | None = None
    schema: GraphQLSchema | None = None
