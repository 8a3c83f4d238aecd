"""Metadata filters: one small grammar, compiled to SQL and mirrored by a plain-Python reference.

The grammar (MongoDB-like, as other LangChain stores accept)::

    {"source": "faq.md"}                         # equality
    {"tier": {"$in": ["pro", "team"]}}           # $eq $ne $gt $gte $lt $lte $in $nin $exists
    {"as_of": {"$gte": "2024-01-01"}}            # ranges on the fact's time
    {"$or": [{"tier": "pro"}, {"price": {"$lt": 10}}]}   # $and / $or; several fields = and

Comparisons are type-strict: a number matches numbers, a string strings, ``True`` only ``True``;
a missing field matches only ``$ne``, ``$nin`` and ``{"$exists": False}``. ``as_of`` compares the
fact's validity start, parsed like any ``as_of``. The SQL and the Python versions must agree; a
unit test checks them against each other on random metadata.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from langchain_understudy.errors import ConfigError
from langchain_understudy.retrieval._time import to_timestamp

__all__ = ["TIME_FIELD", "compile_filter", "matches"]

TIME_FIELD = "as_of"
_OPS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists")
_SQL_CMP = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
_EXAMPLE = "{'source': 'faq.md'} or {'as_of': {'$gte': '2024-01-01'}}"


def compile_filter(flt: Mapping[str, Any]) -> tuple[str, list[Any]]:
    """Return ``(sql, params)``: a boolean SQL expression over the ``facts`` table.

    Raises:
        ConfigError: the filter is not in the grammar above.
    """
    return _clause(flt)


def matches(flt: Mapping[str, Any], metadata: Mapping[str, Any], valid_from: float) -> bool:
    """Return whether one fact passes ``flt`` (the reference the SQL must agree with)."""
    _check_mapping(flt)
    for field, cond in flt.items():
        if field in ("$and", "$or"):
            subs = [matches(c, metadata, valid_from) for c in _check_list(field, cond)]
            if not (all(subs) if field == "$and" else any(subs)):
                return False
            continue
        _check_field(field)
        for op, value in _conditions(cond):
            actual: Any
            if field == TIME_FIELD:
                present, actual = True, valid_from
                value = _times(op, value)
            else:
                present, actual = field in metadata, metadata.get(field)
            if not _py_op(op, value, present, actual):
                return False
    return True


def _check_mapping(flt: object) -> None:
    if not isinstance(flt, Mapping):
        msg = f"a filter must be a dict such as {_EXAMPLE}, got {flt!r}"
        raise ConfigError(msg)


def _check_list(op: str, cond: object) -> Sequence[Any]:
    if not isinstance(cond, list | tuple) or not cond:
        msg = f"{op} takes a non-empty list of filters, got {cond!r}"
        raise ConfigError(msg)
    return cond


def _check_field(field: object) -> None:
    if not isinstance(field, str) or not field or field.startswith("$") or '"' in field:
        msg = (
            f"unknown filter key {field!r}: use a metadata field name, '$and' or '$or' "
            f"(for example {_EXAMPLE})"
        )
        raise ConfigError(msg)


def _conditions(cond: object) -> list[tuple[str, Any]]:
    if isinstance(cond, Mapping):
        if not cond:
            msg = "a field's condition must not be an empty dict; use {'$exists': True}"
            raise ConfigError(msg)
        out = []
        for op, value in cond.items():
            if op not in _OPS:
                msg = f"unknown filter operator {op!r}; use one of {', '.join(_OPS)}"
                raise ConfigError(msg)
            out.append((op, value))
        return out
    return [("$eq", cond)]


def _check_scalar(op: str, value: object, *, ordered: bool = False) -> None:
    kinds = (str, int, float) if ordered else (str, int, float, bool, type(None))
    if not isinstance(value, kinds) or (ordered and isinstance(value, bool)):
        allowed = "a number or a string" if ordered else "a string, number, bool or None"
        msg = f"filter operator {op} needs {allowed}, got {value!r}"
        raise ConfigError(msg)


def _times(op: str, value: Any) -> Any:
    if op == "$exists":
        return value
    if op in ("$in", "$nin"):
        if not isinstance(value, list | tuple):
            msg = f"{op} needs a list, got {value!r}"
            raise ConfigError(msg)
        return [to_timestamp(v, what=f"filter {TIME_FIELD} {op}") for v in value]
    return to_timestamp(value, what=f"filter {TIME_FIELD} {op}")


# --- Python reference ---------------------------------------------------------------------------


def _same_kind(a: object, b: object) -> bool:
    if isinstance(b, bool) or b is None:
        return type(a) is type(b)
    if isinstance(b, int | float):
        return isinstance(a, int | float) and not isinstance(a, bool)
    return isinstance(a, str) and isinstance(b, str)


def _py_eq(value: Any, present: bool, actual: Any) -> bool:
    _check_scalar("$eq", value)
    return present and _same_kind(actual, value) and actual == value


def _py_op(op: str, value: Any, present: bool, actual: Any) -> bool:
    if op == "$eq":
        return _py_eq(value, present, actual)
    if op == "$ne":
        return not _py_eq(value, present, actual)
    if op in ("$in", "$nin"):
        if not isinstance(value, list | tuple):
            msg = f"{op} needs a list, got {value!r}"
            raise ConfigError(msg)
        hit = any(_py_eq(v, present, actual) for v in value)
        return hit if op == "$in" else not hit
    if op == "$exists":
        if not isinstance(value, bool):
            msg = f"$exists needs True or False, got {value!r}"
            raise ConfigError(msg)
        return present == value
    _check_scalar(op, value, ordered=True)
    if not (present and _same_kind(actual, value)):
        return False
    return {
        "$gt": actual > value,
        "$gte": actual >= value,
        "$lt": actual < value,
        "$lte": actual <= value,
    }[op]


# --- SQL ----------------------------------------------------------------------------------------


def _clause(flt: Any) -> tuple[str, list[Any]]:
    _check_mapping(flt)
    parts: list[str] = []
    params: list[Any] = []
    for field, cond in flt.items():
        if field in ("$and", "$or"):
            subs = [_clause(c) for c in _check_list(field, cond)]
            joiner = " AND " if field == "$and" else " OR "
            parts.append("(" + joiner.join(s for s, _ in subs) + ")")
            params += [p for _, ps in subs for p in ps]
            continue
        _check_field(field)
        for op, value in _conditions(cond):
            sql, ps = (
                _sql_time(op, _times(op, value))
                if field == TIME_FIELD
                else _sql_op(field, op, value)
            )
            parts.append(sql)
            params += ps
    if not parts:
        return "1", []
    return "(" + " AND ".join(parts) + ")", params


def _sql_time(op: str, value: Any) -> tuple[str, list[Any]]:
    if op == "$exists":
        return ("1" if value else "0"), []
    if op in ("$in", "$nin"):
        if not value:
            return ("0" if op == "$in" else "1"), []
        marks = ",".join("?" * len(value))
        return f"(valid_from {'IN' if op == '$in' else 'NOT IN'} ({marks}))", list(value)
    sql_op = {"$eq": "=", "$ne": "<>", **_SQL_CMP}[op]
    return f"(valid_from {sql_op} ?)", [value]


def _sql_eq(path: str, value: Any) -> tuple[str, list[Any]]:
    _check_scalar("$eq", value)
    if value is None:
        return "IFNULL(json_type(metadata, ?) = 'null', 0)", [path]
    if isinstance(value, bool):
        return f"IFNULL(json_type(metadata, ?) = '{'true' if value else 'false'}', 0)", [path]
    kind = "IN ('integer', 'real')" if isinstance(value, int | float) else "= 'text'"
    return (
        f"IFNULL(json_type(metadata, ?) {kind} AND json_extract(metadata, ?) = ?, 0)",
        [path, path, value],
    )


def _sql_op(field: str, op: str, value: Any) -> tuple[str, list[Any]]:
    path = '$."' + field + '"'
    if op == "$eq":
        return _sql_eq(path, value)
    if op == "$ne":
        sql, ps = _sql_eq(path, value)
        return f"(NOT {sql})", ps
    if op in ("$in", "$nin"):
        if not isinstance(value, list | tuple):
            msg = f"{op} needs a list, got {value!r}"
            raise ConfigError(msg)
        if not value:
            return ("0" if op == "$in" else "1"), []
        subs = [_sql_eq(path, v) for v in value]
        sql = "(" + " OR ".join(s for s, _ in subs) + ")"
        ps = [p for _, sp in subs for p in sp]
        return (sql if op == "$in" else f"(NOT {sql})"), ps
    if op == "$exists":
        if not isinstance(value, bool):
            msg = f"$exists needs True or False, got {value!r}"
            raise ConfigError(msg)
        return f"(json_type(metadata, ?) IS {'NOT ' if value else ''}NULL)", [path]
    _check_scalar(op, value, ordered=True)
    kind = "IN ('integer', 'real')" if isinstance(value, int | float) else "= 'text'"
    return (
        f"IFNULL(json_type(metadata, ?) {kind} AND json_extract(metadata, ?) {_SQL_CMP[op]} ?, 0)",
        [path, path, value],
    )
