"""Plain-data fields completed without graphql-core's per-field machinery.

graphql-core executes every field of a result the same way: a `Path`, a `GraphQLResolveInfo`,
the resolver call (Strawberry's wrapper around `getattr`), awaitable checks and the value
completion, about as much work for a float in a timeline segment as for a root field that
reads the database. `PlainDataExecutor` plans, once per selection, the fields that are plain
data:

- fields read with Strawberry's default resolver (no resolver of their own, no arguments, no
  field extensions such as permissions), and fields whose resolver is marked `PLAIN` (a sync
  method of `self` only, computing its value from the object alone, safe to call again);
- of a scalar or enum type, of an object type (no `is_type_of`), of an interface whose types
  Strawberry resolves by the value's class, or a list of them, whose selected fields are
  plain data themselves; `__typename` too;
- with no directives but `@skip` / `@include` (already applied by field collection), no
  `@defer`, and no middleware installed (tracing).

Such a field's whole result is built directly: a read per field, built-in scalars copied when
they already have their output type (`str` for String and ID, a finite `float`, a 32-bit
`int`, a `bool`), anything else coerced by its type exactly as graphql-core does. On anything
unusual (null in a non-null position, a value the type cannot coerce, an exception, an
awaitable, an iterable that is not a list or tuple) the field is executed again by graphql-core
from the start, so results, errors, their messages and paths stay exactly what they were.
Other fields (root resolvers, async or argument-taking resolvers, unions) always take
graphql-core's path, and their object results are planned the same way one level down.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection
from math import isfinite
from operator import attrgetter
from typing import Any, cast

from graphql import (
    BooleanValueNode,
    EnumValueNode,
    FieldNode,
    FloatValueNode,
    FragmentDefinitionNode,
    GraphQLBoolean,
    GraphQLField,
    GraphQLFloat,
    GraphQLID,
    GraphQLInt,
    GraphQLInterfaceType,
    GraphQLLeafType,
    GraphQLObjectType,
    GraphQLOutputType,
    GraphQLSchema,
    GraphQLString,
    InlineFragmentNode,
    IntValueNode,
    NullValueNode,
    OperationDefinitionNode,
    OperationType,
    SelectionSetNode,
    StringValueNode,
    get_nullable_type,
    is_interface_type,
    is_leaf_type,
    is_list_type,
    is_non_null_type,
    is_object_type,
)
from graphql.execution.collect_fields import FieldDetailsList, GroupedFieldSet
from graphql.pyutils import AwaitableOrValue, Path, Undefined, gather_with_cancel
from strawberry.execution.is_awaitable import optimized_is_awaitable as _awaitable
from strawberry.schema.schema import StrawberryGraphQLCoreExecutionContext
from strawberry.types.base import StrawberryObjectDefinition
from strawberry.types.cast import get_strawberry_type_cast
from strawberry.types.field import StrawberryField

PLAIN = "mora.plain"
PLAIN_RESOLVER: dict[str, object] = {PLAIN: True}
"""`strawberry.field(metadata=PLAIN_RESOLVER)`: the resolver is a sync method taking only
`self` whose result depends on the object alone, so the executor may call it directly (and call
it again when the field has to be executed by graphql-core)."""

_DEFINITION = "strawberry-definition"
_FIELD_DIRECTIVES = frozenset({"skip", "include"})
_MIN_INT = -(2**31)
_MAX_INT = 2**31 - 1

Getter = Callable[[Any], Any]


class _Fallback(Exception):
    """The value needs graphql-core's completion."""


_FALLBACK = _Fallback()


class _Spec:
    __slots__ = ("nullable",)

    def __init__(self, nullable: bool) -> None:
        self.nullable = nullable

    def complete(self, value: Any) -> Any:
        raise NotImplementedError

    def present(self, value: Any) -> bool:
        """False for a null this position allows; raises _FALLBACK for what only graphql-core
        completes (a null where none is allowed, Undefined, an error, an awaitable)."""
        if value is None:
            if self.nullable:
                return False
            raise _FALLBACK
        if value is Undefined or isinstance(value, Exception) or _awaitable(value):
            raise _FALLBACK
        return True


class _Str(_Spec):
    """String and ID: a `str` is its own output value."""

    __slots__ = ("coerce",)

    def __init__(self, nullable: bool, leaf: GraphQLLeafType) -> None:
        super().__init__(nullable)
        self.coerce = _Coerced(nullable, leaf)

    def complete(self, value: Any) -> Any:
        if type(value) is str:
            return value
        return self.coerce.complete(value)


class _Float(_Str):
    __slots__ = ()

    def complete(self, value: Any) -> Any:
        if type(value) is float and isfinite(value):
            return value
        return self.coerce.complete(value)


class _Int(_Str):
    __slots__ = ()

    def complete(self, value: Any) -> Any:
        if type(value) is int and _MIN_INT <= value <= _MAX_INT:
            return value
        return self.coerce.complete(value)


class _Bool(_Str):
    __slots__ = ()

    def complete(self, value: Any) -> Any:
        if type(value) is bool:
            return value
        return self.coerce.complete(value)


class _Coerced(_Spec):
    """Any leaf: the type's `coerce_output_value`, as `Executor.complete_leaf_value`."""

    __slots__ = ("leaf",)

    def __init__(self, nullable: bool, leaf: GraphQLLeafType) -> None:
        super().__init__(nullable)
        self.leaf = leaf

    def complete(self, value: Any) -> Any:
        if not self.present(value):
            return None
        coerced = self.leaf.coerce_output_value(value)
        if coerced is None or coerced is Undefined:
            raise _FALLBACK
        return coerced


class _Object(_Spec):
    __slots__ = ("fields",)

    def __init__(self, nullable: bool, fields: tuple[tuple[str, Getter, _Spec], ...]) -> None:
        super().__init__(nullable)
        self.fields = fields

    def complete(self, value: Any) -> Any:
        if not self.present(value):
            return None
        return {name: spec.complete(get(value)) for name, get, spec in self.fields}


class _List(_Spec):
    __slots__ = ("item",)

    def __init__(self, nullable: bool, item: _Spec) -> None:
        super().__init__(nullable)
        self.item = item

    def complete(self, value: Any) -> Any:
        if value is None:
            if self.nullable:
                return None
            raise _FALLBACK
        if type(value) is not list and type(value) is not tuple:
            raise _FALLBACK
        complete = self.item.complete
        return [complete(item) for item in value]


class _Abstract(_Spec):
    """An interface whose runtime type is the value's class: each implementing Strawberry
    type's own `_Object`, found by `type(value)`."""

    __slots__ = ("by_class",)

    def __init__(self, nullable: bool, by_class: dict[type, _Spec]) -> None:
        super().__init__(nullable)
        self.by_class = by_class

    def complete(self, value: Any) -> Any:
        if not self.present(value):
            return None
        spec = self.by_class.get(type(value))
        if spec is None or get_strawberry_type_cast(value) is not None:
            raise _FALLBACK
        return spec.complete(value)


class _Constant(_Spec):
    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        super().__init__(False)
        self.value = value

    def complete(self, value: Any) -> Any:
        return self.value


def _no_value(_source: Any) -> None:
    return None


_LEAF_SPECS: dict[object, type[_Str]] = {
    GraphQLString: _Str,
    GraphQLID: _Str,
    GraphQLFloat: _Float,
    GraphQLInt: _Int,
    GraphQLBoolean: _Bool,
}


def _getter(field_def: GraphQLField) -> Getter | None:
    """How to read a plain-data field from its parent object; None for any other field."""
    definition = (field_def.extensions or {}).get(_DEFINITION)
    resolve = field_def.resolve
    if not isinstance(definition, StrawberryField) or resolve is None:
        return None
    if definition.is_basic_field:
        if getattr(resolve, "__name__", None) != "_get_basic_result":
            return None  # exception handlers (or a Strawberry release that resolves otherwise)
        read = definition.default_resolver
        name = definition.python_name
        if read is getattr:
            return attrgetter(name)
        return lambda source: read(source, name)
    resolver = definition.base_resolver
    if (
        resolver is None
        or not definition.metadata.get(PLAIN)
        or definition.extensions
        or definition.arguments
        or definition.is_async
        or getattr(resolve, "__name__", None) != "_resolver"
        or resolver.self_parameter is None
        or resolver.info_parameter is not None
        or resolver.root_parameter is not None
        or resolver.parent_parameter is not None
    ):
        return None
    method = resolver.wrapped_func
    return method if callable(method) else None


class PlainDataExecutor(StrawberryGraphQLCoreExecutionContext):
    """Strawberry's executor, completing plain-data fields directly (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        manager = self.middleware_manager
        self._planning = manager is None or not manager.middlewares
        self._plans: dict[int, tuple[GroupedFieldSet, _Plan | None]] = {}
        self._shared = (
            _SHARED.plans(self.schema, self.operation, self.fragment_definitions)
            if self._planning
            else None
        )

    def build_per_event_executor(self, payload: Any) -> PlainDataExecutor:
        executor = cast("PlainDataExecutor", super().build_per_event_executor(payload))
        executor._plans = {}  # the plans keep their field sets alive: one event's at a time
        return executor

    def execute_fields(
        self,
        parent_type: GraphQLObjectType,
        source_value: Any,
        path: Path | None,
        grouped_field_set: GroupedFieldSet,
        position_context: Any,
    ) -> AwaitableOrValue[dict[str, Any]]:
        plan = (
            None
            if path is None or position_context is not None or not self._planning
            else self._plan(parent_type, grouped_field_set)
        )
        if plan is None:
            return super().execute_fields(
                parent_type, source_value, path, grouped_field_set, position_context
            )
        results: dict[str, Any] = {}
        is_awaitable = self.is_awaitable
        awaitable_fields: list[str] = []
        try:
            for (response_name, field_details_list), (get, spec) in zip(
                grouped_field_set.items(), plan, strict=True
            ):
                if get is not None and spec is not None:
                    try:
                        results[response_name] = spec.complete(get(source_value))
                        continue
                    except Exception:  # noqa: S110 - graphql-core executes the field instead
                        pass
                result = self.execute_field(
                    parent_type,
                    source_value,
                    field_details_list,
                    Path(path, response_name, parent_type.name),
                    position_context,
                )
                if result is not Undefined:
                    results[response_name] = result
                    if is_awaitable(result):
                        awaitable_fields.append(response_name)
        except Exception:
            if awaitable_fields:
                self.settle_in_background([results[field] for field in awaitable_fields])
            raise
        if not awaitable_fields:
            return results

        async def get_results() -> dict[str, Any]:
            if len(awaitable_fields) == 1:
                field = awaitable_fields[0]
                results[field] = await results[field]
            else:
                awaited = await gather_with_cancel(*(results[field] for field in awaitable_fields))
                results.update(zip(awaitable_fields, awaited, strict=True))
            return results

        return get_results()

    def _plan(
        self, parent_type: GraphQLObjectType, grouped_field_set: GroupedFieldSet
    ) -> _Plan | None:
        """How to complete each field of this set (None when no field is plain data),
        memoized on the set's identity like graphql-core's `collect_subfields`, and across
        requests for the operation when its field sets cannot depend on variables."""
        cached = self._plans.get(id(grouped_field_set))
        if cached is not None:
            return cached[1]
        shared = self._shared
        if shared is None:
            plan = self._new_plan(parent_type, grouped_field_set)
        else:
            key = (
                parent_type.name,
                *(
                    (name, *(id(details.node) for details in field_details_list))
                    for name, field_details_list in grouped_field_set.items()
                ),
            )
            if key in shared:
                plan = shared[key]
            else:
                plan = shared[key] = self._new_plan(parent_type, grouped_field_set)
        self._plans[id(grouped_field_set)] = (grouped_field_set, plan)
        return plan

    def _new_plan(
        self, parent_type: GraphQLObjectType, grouped_field_set: GroupedFieldSet
    ) -> _Plan | None:
        try:
            plan = tuple(
                self._field_plan(parent_type, details) for details in grouped_field_set.values()
            )
        except RecursionError:
            return None
        return plan if any(spec is not None for _get, spec in plan) else None

    def _field_plan(
        self, parent_type: GraphQLObjectType, field_details_list: FieldDetailsList
    ) -> tuple[Getter, _Spec] | tuple[None, None]:
        node = field_details_list[0].node
        name = node.name.value
        if name == "__typename":
            return _no_value, _Constant(parent_type.name)
        field_def = parent_type.fields.get(name)
        if field_def is None or field_def.args or node.arguments:
            return None, None
        for details in field_details_list:
            if details.defer_usage is not None or details.fragment_variable_values is not None:
                return None, None
            if not _only(details.node.directives, _FIELD_DIRECTIVES):
                return None, None
        get = _getter(field_def)
        if get is None:
            return None, None
        spec = self._type_plan(field_def.type, field_details_list)
        if spec is None:
            return None, None
        return get, spec

    @property
    def plans_shared(self) -> bool:
        """The operation's field sets do not depend on its variables (plans are shared)."""
        return self._shared is not None

    def type_plan(
        self, return_type: GraphQLOutputType, field_details_list: FieldDetailsList
    ) -> _Spec | None:
        """The completion of a whole value of `return_type` selected by these fields, or None
        when some part of it is not plain data."""
        try:
            return self._type_plan(return_type, field_details_list)
        except RecursionError:
            return None

    def _type_plan(
        self, return_type: GraphQLOutputType, field_details_list: FieldDetailsList
    ) -> _Spec | None:
        nullable = not is_non_null_type(return_type)
        inner = get_nullable_type(return_type)
        if is_list_type(inner):
            item = self._type_plan(inner.of_type, field_details_list)
            return None if item is None else _List(nullable, item)
        if is_leaf_type(inner):
            leaf_spec = _LEAF_SPECS.get(inner)
            if leaf_spec is not None:
                return leaf_spec(nullable, inner)
            return _Coerced(nullable, inner)
        if is_interface_type(inner):
            return self._interface_plan(nullable, inner, field_details_list)
        if not is_object_type(inner) or inner.is_type_of is not None:
            return None
        return self._object_plan(nullable, inner, field_details_list)

    def _object_plan(
        self, nullable: bool, inner: GraphQLObjectType, field_details_list: FieldDetailsList
    ) -> _Object | None:
        grouped_field_set, new_defer_usages, _forbidden = self.collect_subfields(
            inner, field_details_list
        )
        if new_defer_usages:
            return None
        fields: list[tuple[str, Getter, _Spec]] = []
        for response_name, details in grouped_field_set.items():
            get, spec = self._field_plan(inner, details)
            if get is None or spec is None:
                return None
            fields.append((response_name, get, spec))
        return _Object(nullable, tuple(fields))

    def _interface_plan(
        self, nullable: bool, inner: GraphQLInterfaceType, field_details_list: FieldDetailsList
    ) -> _Abstract | None:
        """Strawberry's own type resolution (no `resolve_type` of the interface's, no
        `is_type_of` or generics of its types') names the value's class's type: each
        implementing type whose selection is plain data is planned as an object, keyed by its
        class."""
        interface = inner.extensions.get(_DEFINITION)
        if not isinstance(interface, StrawberryObjectDefinition) or interface.resolve_type:
            return None
        by_class: dict[type, _Spec] = {}
        for possible in self.schema.get_possible_types(inner):
            definition = possible.extensions.get(_DEFINITION)
            if (
                not isinstance(definition, StrawberryObjectDefinition)
                or definition.is_type_of is not None
                or definition.is_graphql_generic
                or definition.concrete_of is not None
                or not issubclass(definition.origin, interface.origin)
            ):
                return None
            spec = self._object_plan(False, possible, field_details_list)
            if spec is not None:  # (a value of a type left out is completed by graphql-core)
                by_class[definition.origin] = spec
        return _Abstract(nullable, by_class) if by_class else None


def only_root_field(
    operation: OperationDefinitionNode, kind: OperationType, name: str
) -> FieldNode | None:
    """The operation's only root selection, when the operation is a `kind` and that selection
    is the field `name`, neither with directives (compiled operations start from it)."""
    if operation.operation is not kind or operation.directives:
        return None
    selections = operation.selection_set.selections
    if len(selections) != 1:
        return None
    field = selections[0]
    if not isinstance(field, FieldNode) or field.name.value != name or field.directives:
        return None
    return field


def response_name(field: FieldNode) -> str:
    return field.alias.value if field.alias else field.name.value


Spec = _Spec
"""How a value of one selection is completed (`PlainDataExecutor.type_plan`); `complete`
raises for anything only graphql-core completes."""
_Plan = tuple[tuple[Getter, _Spec] | tuple[None, None], ...]
_Plans = dict[tuple[Any, ...], _Plan | None]
_LITERALS = (
    NullValueNode,
    BooleanValueNode,
    StringValueNode,
    IntValueNode,
    FloatValueNode,
    EnumValueNode,
)


class _SharedPlans:
    """The plans of recent operations, per schema, reused across requests: a field set
    depends on the variables only through `@skip` / `@include` arguments and fragment
    arguments, so the plans of an operation without variables there are the same for
    every request. Keys hold AST node ids; each entry keeps its operation alive, so an id
    cannot be reused by another document while the entry exists."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.by_schema: weakref.WeakKeyDictionary[
            GraphQLSchema,
            OrderedDict[
                int, tuple[OperationDefinitionNode, dict[tuple[Any, ...], _Plan | None] | None]
            ],
        ] = weakref.WeakKeyDictionary()

    def plans(
        self,
        schema: GraphQLSchema,
        operation: OperationDefinitionNode,
        fragments: dict[str, FragmentDefinitionNode],
    ) -> _Plans | None:
        """The shared plans of `operation`, None when they depend on the variables."""
        operations = self.by_schema.get(schema)
        if operations is None:
            operations = self.by_schema[schema] = OrderedDict()
        entry = operations.get(id(operation))
        if entry is not None:
            operations.move_to_end(id(operation))
            return entry[1]
        static = _static(operation.selection_set) and all(
            not fragment.variable_definitions and _static(fragment.selection_set)
            for fragment in fragments.values()
        )
        plans: _Plans | None = {} if static else None
        operations[id(operation)] = (operation, plans)
        while len(operations) > self.size:
            operations.popitem(last=False)
        return plans


_SHARED = _SharedPlans(256)


def _static(selection_set: SelectionSetNode | None) -> bool:
    """No directive in these selections takes a variable."""
    if selection_set is None:
        return True
    for selection in selection_set.selections:
        for directive in selection.directives or ():
            for argument in directive.arguments or ():
                if not isinstance(argument.value, _LITERALS):
                    return False
        if isinstance(selection, FieldNode | InlineFragmentNode) and not _static(
            selection.selection_set
        ):
            return False
    return True


def _only(directives: Collection[Any] | None, names: frozenset[str]) -> bool:
    return not directives or all(directive.name.value in names for directive in directives)
