"""Hand-built SQL: the statements a change set needs that the ORM cannot write.

An upsert that keeps the later of two times (``INSERT ... ON CONFLICT DO UPDATE``
with ``GREATEST``), and ``DELETE ... RETURNING``: each one statement for a
whole batch, on PostgreSQL and on SQLite (3.35 or later, for ``RETURNING``).
Values go through each field's own conversion, as the ORM's would.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

from django.conf import settings
from django.db import connections, models, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import F, Lookup, QuerySet, signals
from django.db.models.base import ModelState
from django.db.models.expressions import RawSQL

logger = logging.getLogger("channels_presence")

# psycopg sends at most this many parameters with one statement.
_POSTGRESQL_MAX_PARAMS = 65_535

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

M = TypeVar("M", bound=models.Model)

#: A statement and its parameters.
Statement = tuple[str, Sequence[Any]]


def max_params(connection: BaseDatabaseWrapper) -> int:
    """How many parameters one statement may carry on ``connection``.

    SQLite's real limit, not Django's 999 (the limit of SQLite before 3.32).
    """
    if connection.vendor == "sqlite":
        connection.ensure_connection()
        raw = cast(sqlite3.Connection, connection.connection)
        return raw.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    return connection.features.max_query_params or _POSTGRESQL_MAX_PARAMS


def chunks(
    rows: Sequence[Any], width: int, connection: BaseDatabaseWrapper
) -> list[Sequence[Any]]:
    """``rows`` cut so that no statement carries more parameters than allowed."""
    size = max(1, max_params(connection) // max(width, 1))
    return [rows[start : start + size] for start in range(0, len(rows), size)]


def upsert_statements(
    model: type[models.Model],
    using: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    conflict: Sequence[str],
    replace: Sequence[str] = (),
    keep_latest: Sequence[str] = (),
    returning: Sequence[str] = (),
) -> list[Statement]:
    """Insert ``rows``; where a row of the ``conflict`` fields exists, update it.

    On a conflict, the fields of ``replace`` take the new values, those of
    ``keep_latest`` the greater of the old and the new (a time that must
    never go back); each statement returns the ``returning`` fields of the
    rows it wrote. ``columns`` and the others name model fields (attnames).
    The statements, for :func:`together`: one on PostgreSQL, whatever the
    rows; none for no rows.
    """
    if not rows:
        return []
    connection = connections[using]
    meta = model._meta
    fields = [cast("models.Field[Any, Any]", meta.get_field(name)) for name in columns]
    shape = (
        model,
        using,
        *map(tuple, (columns, conflict, replace, keep_latest, returning)),
    )
    texts = _UPSERTS.get(shape)
    if texts is None:
        texts = _UPSERTS[shape] = _upsert_texts(
            model, connection, fields, conflict, replace, keep_latest, returning
        )
    target, from_json, from_arrays, tail = texts
    converters = [_converter(field, connection) for field in fields]
    converted = [
        [convert(value) for convert, value in zip(converters, row, strict=True)]
        for row in rows
    ]
    document = _json_rows(converted) if connection.vendor == "postgresql" else None
    if document is not None:
        # One JSON document of every row, whatever their number: psycopg
        # adapts a list element by element in Python, json in C; a VALUES
        # list of thousands of parameters costs more to compose than to run.
        return [(f"{target}{from_json}{tail}", [document])]
    if connection.vendor == "postgresql":
        # One array per column, whatever the number of rows.
        columns_of = [list(c) for c in zip(*converted, strict=True)]
        return [(f"{target}{from_arrays}{tail}", columns_of)]
    placeholder = "(" + ", ".join(["%s"] * len(fields)) + ")"
    return [
        (
            f"{target}VALUES {', '.join([placeholder] * len(part))}{tail}",
            [value for row in part for value in row],
        )
        for part in chunks(converted, len(fields), connection)
    ]


#: The parts of each upsert's SQL, the same at every call: the INSERT, the
#: SELECT of a JSON document, the SELECT of arrays (PostgreSQL), the ON CONFLICT.
_UPSERTS: dict[tuple[Any, ...], tuple[str, str, str, str]] = {}


def _upsert_texts(
    model: type[models.Model],
    connection: BaseDatabaseWrapper,
    fields: list[models.Field[Any, Any]],
    conflict: Sequence[str],
    replace: Sequence[str],
    keep_latest: Sequence[str],
    returning: Sequence[str],
) -> tuple[str, str, str, str]:
    """The parts of an upsert's SQL (see ``_UPSERTS``)."""
    quote = connection.ops.quote_name
    meta = model._meta
    table = quote(meta.db_table)
    greatest = "GREATEST" if connection.vendor == "postgresql" else "MAX"

    def column(name: str) -> str:
        return quote(cast("models.Field[Any, Any]", meta.get_field(name)).column)

    updates = [f"{column(name)} = EXCLUDED.{column(name)}" for name in replace] + [
        f"{column(name)} = {greatest}({table}.{column(name)}, EXCLUDED.{column(name)})"
        for name in keep_latest
    ]
    action = f"DO UPDATE SET {', '.join(updates)}" if updates else "DO NOTHING"
    target = f"INSERT INTO {table} ({', '.join(quote(f.column) for f in fields)}) "
    tail = f" ON CONFLICT ({', '.join(column(name) for name in conflict)}) {action}"
    if returning:
        tail += f" RETURNING {', '.join(column(name) for name in returning)}"
    types = [field.db_type(connection) for field in fields]
    values = ", ".join(f"(row->>{n})::{kind}" for n, kind in enumerate(types))
    from_json = f"SELECT {values} FROM json_array_elements(%s::json) AS row"
    from_arrays = f"SELECT * FROM unnest({', '.join(f'%s::{t}[]' for t in types)})"
    return target, from_json, from_arrays, tail


def delete_statements(
    model: type[models.Model], using: str, pks: Sequence[Any]
) -> list[Statement]:
    """Delete the rows of ``pks``, nothing read back and no signal sent: one
    statement on PostgreSQL, one per parameter limit elsewhere."""
    connection = connections[using]
    quote = connection.ops.quote_name
    meta = model._meta
    prefix = f"DELETE FROM {quote(meta.db_table)} WHERE {quote(meta.pk.column)}"
    if connection.vendor == "postgresql":
        kind = cast(Any, meta.pk).rel_db_type(connection)
        return [(f"{prefix} = ANY(%s::{kind}[])", [list(pks)])]
    return [
        (f"{prefix} IN ({', '.join(['%s'] * len(part))})", list(part))
        for part in chunks(pks, 1, connection)
    ]


def statement(queryset: QuerySet[Any]) -> Statement:
    """The SQL and parameters that ``queryset`` would run, for :func:`together`."""
    sql, params = queryset.query.get_compiler(queryset.db).as_sql()
    return sql, params


class Slot:
    """A parameter of a :func:`compiled` statement, filled in at each use."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


_COMPILED: dict[tuple[str, str], list[Statement]] = {}


def compiled(
    name: str,
    using: str,
    build: Callable[..., Sequence[QuerySet[Any]]],
    *values: Any,
) -> list[Statement]:
    """The statements of the querysets ``build(*values)``, compiled once.

    On PostgreSQL, where :func:`any_of` passes a list of any length as one
    array parameter, the SQL of a query built only from ``any_of`` filters
    does not depend on the values: it is compiled once per ``name`` and
    database, with a :class:`Slot` for each value, and each use fills the
    slots in. Building and compiling the querysets of a lone join each time
    cost more than running them. Elsewhere it is compiled at each call.
    ``build`` must pass each value only to ``any_of``.
    """
    if connections[using].vendor != "postgresql":
        return [statement(query) for query in build(*values)]
    template = _COMPILED.get((name, using))
    if template is None:
        slots = [Slot(index) for index in range(len(values))]
        template = [statement(query) for query in build(*slots)]
        _COMPILED[name, using] = template
    return [
        (text, [values[p.index] if isinstance(p, Slot) else p for p in params])
        for text, params in template
    ]


def can_combine(connection: BaseDatabaseWrapper) -> bool:
    """Whether :func:`together` sends its statements in one round trip here.

    With psycopg 3's client-side binding cursor, what Django's PostgreSQL
    backend uses unless ``server_side_binding`` is set: several statements in
    one string are one round trip, and their results come one after another.
    """
    if connection.vendor != "postgresql":
        return False
    try:
        from psycopg import ClientCursor
    except ImportError:  # psycopg2
        return False
    connection.ensure_connection()
    factory = getattr(connection.connection, "cursor_factory", None)
    return isinstance(factory, type) and issubclass(factory, ClientCursor)


def together(
    connection: BaseDatabaseWrapper, statements: Sequence[Statement]
) -> list[list[tuple[Any, ...]]]:
    """Run ``statements`` in order; the rows of each (empty for those with none).

    One round trip where :func:`can_combine` says so, else one each. A
    change set waits for each round trip with its locks held, and a lone
    join's reads are five statements. Each statement takes parameters (a
    literal ``%`` is written ``%%``); the first that fails raises, and the
    transaction is then to be rolled back, as with one statement.
    """
    results: list[list[tuple[Any, ...]]] = []
    if not statements:
        return results
    with connection.cursor() as cursor:
        if not can_combine(connection):
            for statement, params in statements:
                cursor.execute(statement, params)
                results.append(_rows(cursor))
            return results
        cursor.execute(
            "; ".join(statement for statement, _ in statements),
            [param for _, params in statements for param in params],
        )
        while True:
            results.append(_rows(cursor))
            if not cursor.nextset():
                break
    if len(results) != len(statements):  # pragma: no cover - a bug
        raise RuntimeError(f"{len(statements)} statements gave {len(results)} results")
    return results


class Transaction:
    """A transaction that :func:`atomic` opened: run its statements through it.

    On PostgreSQL with psycopg 3, outside any other transaction, its
    ``BEGIN`` goes to the server with its first statements and its
    ``COMMIT`` with its last (:meth:`finish`): a lone join's transaction
    took five round trips with its locks held, two of them only for
    ``BEGIN`` and ``COMMIT``. Elsewhere it is Django's ``atomic()``, and
    these methods are :func:`together` and ``on_commit``.
    """

    def __init__(self, connection: BaseDatabaseWrapper, *, own: bool) -> None:
        self.connection = connection
        # Whether this object sends BEGIN and COMMIT itself, else Django's
        # atomic() does.
        self.own = own
        self.begun = False
        self.committed = False
        self.hooks: list[Callable[[], Any]] = []

    def run(self, statements: Sequence[Statement]) -> list[list[tuple[Any, ...]]]:
        """:func:`together`, with ``BEGIN`` first if nothing ran yet."""
        return self._trip(statements, commit=False)

    def finish(self, statements: Sequence[Statement]) -> list[list[tuple[Any, ...]]]:
        """Run the last statements of the transaction, ``COMMIT`` with them.

        Nothing may run in it after this; elsewhere the transaction commits
        when ``atomic()`` ends, as always.
        """
        return self._trip(statements, commit=self.own)

    def on_commit(self, callback: Callable[[], Any]) -> None:
        """Call ``callback`` once the transaction commits; a failure is logged."""
        if self.own:
            self.hooks.append(callback)
        else:
            transaction.on_commit(callback, using=self.connection.alias, robust=True)

    def _trip(
        self, statements: Sequence[Statement], *, commit: bool
    ) -> list[list[tuple[Any, ...]]]:
        wrapped = list(statements)
        begin = self.own and not self.begun
        if begin:
            wrapped.insert(0, ("BEGIN", []))
            self.begun = True
        if commit:
            wrapped.append(("COMMIT", []))
        results = together(self.connection, wrapped)
        if commit:
            self.committed = True
            results.pop()
        return results[1:] if begin else results

    def _begin_first(
        self,
        execute: Callable[..., Any],
        sql: str,
        params: Any,
        many: bool,
        context: dict[str, Any],
    ) -> Any:
        # Any statement run on the connection meanwhile (the ORM's reads,
        # say) goes in the transaction: BEGIN first, if nothing sent it.
        if self.committed:
            raise RuntimeError(f"a statement after the transaction's COMMIT: {sql}")
        if not self.begun:
            self.begun = True
            context["cursor"].execute("BEGIN")
        return execute(sql, params, many, context)

    def _end(self, failed: bool) -> None:
        if not self.begun:
            return
        if not failed:
            if not self.committed:
                self._trip([], commit=True)
            return
        from psycopg import pq

        raw = self.connection.connection
        if raw is None or raw.info.transaction_status == pq.TransactionStatus.IDLE:
            return
        try:
            with self.connection.cursor() as cursor:
                cursor.execute("ROLLBACK")
        except Exception:
            # The connection is broken: the server rolls back when it closes.
            self.connection.close()


@contextmanager
def atomic(using: str) -> Iterator[Transaction]:
    """A transaction on database ``using``, as ``transaction.atomic(using)``.

    Where :func:`together` combines statements and the connection is in
    autocommit, with no transaction open, its BEGIN and COMMIT go with its
    statements (:class:`Transaction`). Meanwhile psycopg stays in autocommit
    while Django takes the connection for one in a transaction, as after
    ``set_autocommit(False)``: the ORM's ``select_for_update()`` works, and
    an ``atomic()`` inside is a savepoint. A statement may run in it by any
    path: the first sends BEGIN if :meth:`Transaction.run` did not.
    """
    connection = connections[using]
    if (
        not can_combine(connection)
        or connection.in_atomic_block
        or not connection.get_autocommit()
    ):
        with transaction.atomic(using=using):
            yield Transaction(connection, own=False)
        return
    current = Transaction(connection, own=True)
    failed = True
    connection.autocommit = False
    try:
        with connection.execute_wrapper(current._begin_first):
            yield current
            failed = False
    finally:
        connection.autocommit = True
        connection.needs_rollback = False
        current._end(failed)
    for callback in current.hooks:
        try:
            callback()
        except Exception:
            logger.exception("presence: %r failed after commit", callback)


def _rows(cursor: Any) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in cursor.fetchall()] if cursor.description else []


#: Fields whose conversion leaves a str, int, bool or None as it is.
_PLAIN_FIELDS = {
    "AutoField",
    "BigAutoField",
    "BigIntegerField",
    "BooleanField",
    "CharField",
    "IntegerField",
    "PositiveBigIntegerField",
    "PositiveIntegerField",
    "PositiveSmallIntegerField",
    "SmallAutoField",
    "SmallIntegerField",
    "TextField",
}
_PLAIN_TYPES = (str, int, bool, type(None))


def _converter(
    field: models.Field[Any, Any], connection: BaseDatabaseWrapper
) -> Callable[[Any], Any]:
    """What the ORM would do to a value of ``field`` before saving it.

    The same, ``get_db_prep_save``, but without its cost per value where that
    is known to change nothing: a batch converts thousands of values.
    """
    target = field.target_field if field.is_relation else field  # type: ignore[attr-defined]
    kind = target.get_internal_type()
    if kind in _PLAIN_FIELDS:

        def plain(value: Any) -> Any:
            if isinstance(value, _PLAIN_TYPES):
                return value
            return field.get_db_prep_save(value, connection)

        return plain
    if kind == "DateTimeField" and settings.USE_TZ:
        adapt = connection.ops.adapt_datetimefield_value

        def moment(value: Any) -> Any:
            if isinstance(value, datetime) and value.tzinfo is not None:
                return adapt(value)
            return field.get_db_prep_save(value, connection)

        return moment
    return lambda value: field.get_db_prep_save(value, connection)


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not plain JSON")


def _json_rows(rows: list[list[Any]]) -> str | None:
    """``rows`` as one JSON document, or None if a value is not plain JSON."""
    try:
        return json.dumps(rows, default=_json_value, allow_nan=False)
    except (TypeError, ValueError):
        return None


def delete_returning(locked: QuerySet[Any], names: list[str]) -> list[Any]:
    """``DELETE ... RETURNING`` the rows of ``locked``: one statement.

    ``names`` are the attnames to return, converted as a queryset would.
    """
    meta = locked.model._meta
    connection = connections[locked.db]
    quote = connection.ops.quote_name
    fields = [cast("models.Field[Any, Any]", meta.get_field(name)) for name in names]
    # On PostgreSQL, timestamps as microseconds since the epoch: psycopg reads
    # a bigint in C, while Django reads a timestamptz in Python whenever the
    # server's TimeZone is not exactly "UTC" (Debian's is "Etc/UTC"), and
    # that was most of the time spent reading a prune's rows, measured.
    in_epoch = {
        number
        for number, field in enumerate(fields)
        if connection.vendor == "postgresql"
        and settings.USE_TZ
        and field.get_internal_type() == "DateTimeField"
    }
    columns = [
        f"(EXTRACT(EPOCH FROM {quote(field.column)}) * 1000000)::bigint"
        if number in in_epoch
        else quote(field.column)
        for number, field in enumerate(fields)
    ]
    compiler = locked.values("pk").query.get_compiler(locked.db)
    select, params = compiler.as_sql()
    with connection.cursor() as cursor:
        cursor.execute(
            f"DELETE FROM {quote(meta.db_table)} WHERE {quote(meta.pk.column)}"
            f" IN ({select}) RETURNING {', '.join(columns)}",
            params,
        )
        rows: list[Any] = cursor.fetchall()
    if in_epoch:
        rows = [
            [
                _EPOCH + timedelta(microseconds=value)
                if number in in_epoch and value is not None
                else value
                for number, value in enumerate(row)
            ]
            for row in rows
        ]
    # What a queryset does to each other value read (e.g. SQLite's datetimes).
    converters = {
        number: converter
        for number, converter in compiler.get_converters(
            [field.get_col(meta.db_table) for field in fields]
        ).items()
        if number not in in_epoch
    }
    if converters:
        rows = list(compiler.apply_converters(rows, converters))
    return rows


def instances(
    model: type[M], using: str, names: Sequence[str], rows: Iterable[Sequence[Any]]
) -> list[M]:
    """Model instances of ``rows`` (values of every concrete field, by attname).

    What ``Model.from_db`` makes, without ``Model.__init__``'s work per field:
    a prune builds tens of thousands. ``from_db`` itself when the model has
    ``pre_init`` or ``post_init`` receivers, or ``names`` are not its fields.
    """
    meta = model._meta
    if (
        list(names) != [field.attname for field in meta.concrete_fields]
        or signals.pre_init.has_listeners(model)
        or signals.post_init.has_listeners(model)
    ):
        return [model.from_db(using, list(names), list(row)) for row in rows]
    built = []
    for row in rows:
        instance = model.__new__(model)
        instance.__dict__.update(zip(names, row, strict=True))
        state = instance._state = ModelState()
        state.adding = False
        state.db = using
        built.append(instance)
    return built


def convert(
    model: type[models.Model], using: str, names: Sequence[str], rows: list[Any]
) -> list[Any]:
    """Rows of raw column values, converted as a queryset would convert them."""
    # The same for every row, ever: a lone join asks three times.
    return converted(
        (model, using, tuple(names)),
        lambda: model._base_manager.using(using).values_list(*names),
        rows,
    )


def converted(
    key: Any, build: Callable[[], QuerySet[Any]], rows: list[Any]
) -> list[Any]:
    """Rows of raw values of the columns of ``build()``, a ``values_list()``
    queryset, converted as it would convert them: for rows that
    :func:`together` read. ``key`` names the queryset's columns: once they
    are known to need no converter, the queryset is not built again."""
    if key in _UNCONVERTED:
        return rows
    queryset = build()
    compiler = queryset.query.get_compiler(queryset.db)
    compiler.setup_query()
    columns = [column for column, _, _ in compiler.select[: compiler.col_count]]
    converters = compiler.get_converters(columns)
    if not converters:
        _UNCONVERTED.add(key)
        return rows
    return list(compiler.apply_converters(rows, converters))


#: The keys of :func:`converted` querysets whose values no converter changes
#: (PostgreSQL's, mostly).
_UNCONVERTED: set[Any] = set()


def epoch_micros(queryset: QuerySet[Any], name: str) -> Any:
    """An expression of field ``name`` in epoch microseconds, or None.

    On PostgreSQL with time zones on: a bigint, which psycopg reads in C,
    where Django reads a timestamptz in Python whenever the server's TimeZone
    is not exactly "UTC" (Debian's is "Etc/UTC"). None elsewhere: read the
    field as it is.
    """
    connection = connections[queryset.db]
    if connection.vendor != "postgresql" or not settings.USE_TZ:
        return None
    column = cast("models.Field[Any, Any]", queryset.model._meta.get_field(name)).column
    table = connection.ops.quote_name(queryset.model._meta.db_table)
    return RawSQL(
        f"(EXTRACT(EPOCH FROM {table}.{connection.ops.quote_name(column)})"
        " * 1000000)::bigint",
        [],
        output_field=models.BigIntegerField(),
    )


class AnyOf(Lookup):  # type: ignore[type-arg]
    """``lhs = ANY(%s)``: ``lhs`` equals one of a list, sent as one array
    parameter (PostgreSQL). Used as an expression: ``filter(AnyOf(F(name), values))``.
    """

    lookup_name = "any_of"
    prepare_rhs = False

    def as_sql(self, compiler: Any, connection: BaseDatabaseWrapper) -> Any:
        lhs, params = self.process_lhs(compiler, connection)
        return f"{lhs} = ANY(%s)", [*params, self.rhs]


def any_of(
    queryset: QuerySet[Any], column: str, values: list[Any]
) -> list[QuerySet[Any]]:
    """``queryset`` filtered to ``column`` in ``values``, as few querysets as can be.

    On PostgreSQL one array parameter for any number of values: an IN list of
    tens of thousands costs more to build and send than the lookup itself.
    Elsewhere, IN lists within the parameter limit.
    """
    connection = connections[queryset.db]
    if connection.vendor == "postgresql":
        return [queryset.filter(AnyOf(F(column), values))]
    size = max(1, max_params(connection) - 100)
    return [
        queryset.filter(**{f"{column}__in": values[start : start + size]})
        for start in range(0, len(values), size)
    ]
