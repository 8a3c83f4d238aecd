"""The metadata filter grammar: SQL compilation agrees with the plain-Python reference."""

from __future__ import annotations

import json
import random
import sqlite3
from typing import Any

import pytest

from langchain_understudy.errors import ConfigError
from langchain_understudy.retrieval._filters import compile_filter, matches
from langchain_understudy.retrieval._time import to_timestamp

_VALUES: list[Any] = ["pro", "basic", "team", "", "Zürich", 0, 1, 2, 2.5, -3, True, False, None]
_FIELDS = ["tier", "price", "flag", "name with space"]
_TIMES = ["2024-01-01", "2024-03-15T12:00:00Z", "2024-06-01", "2025-01-01"]


def _random_metadata(rng: random.Random) -> dict[str, Any]:
    md: dict[str, Any] = {}
    for field in _FIELDS:
        if rng.random() < 0.75:
            md[field] = rng.choice(_VALUES)
    if rng.random() < 0.1:
        md["tier"] = ["pro", "team"]  # a list never equals a scalar
    return md


def _random_condition(rng: random.Random) -> Any:
    op = rng.choice(["eq", "$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists"])
    if op == "eq":
        return rng.choice(_VALUES)
    if op in ("$gt", "$gte", "$lt", "$lte"):
        return {op: rng.choice(["basic", "pro", "m", 0, 1, 2.5, -1])}
    if op in ("$in", "$nin"):
        return {op: rng.sample(_VALUES, rng.randint(0, 3))}
    if op == "$exists":
        return {op: rng.random() < 0.5}
    return {op: rng.choice(_VALUES)}


def _random_filter(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    if depth < 2 and rng.random() < 0.25:
        op = rng.choice(["$and", "$or"])
        return {op: [_random_filter(rng, depth + 1) for _ in range(rng.randint(1, 3))]}
    flt: dict[str, Any] = {}
    for field in rng.sample(_FIELDS, rng.randint(1, 2)):
        flt[field] = _random_condition(rng)
    if rng.random() < 0.3:
        op = rng.choice(["$gte", "$lt", "$eq", "$in"])
        flt["as_of"] = {op: rng.sample(_TIMES, 2) if op == "$in" else rng.choice(_TIMES)}
    return flt


def test_sql_agrees_with_python_reference_on_random_filters() -> None:
    rng = random.Random(7)
    con = sqlite3.connect(":memory:")
    con.execute("CREATE TABLE facts (vid INTEGER PRIMARY KEY, metadata TEXT, valid_from REAL)")
    rows = []
    for vid in range(300):
        md = _random_metadata(rng)
        rows.append((vid, md, to_timestamp(rng.choice(_TIMES))))
    con.executemany(
        "INSERT INTO facts VALUES (?, ?, ?)", [(v, json.dumps(m), t) for v, m, t in rows]
    )
    nonempty = 0
    for _ in range(400):
        flt = _random_filter(rng)
        sql, params = compile_filter(flt)
        got = {r[0] for r in con.execute(f"SELECT vid FROM facts WHERE {sql}", params)}
        want = {v for v, m, t in rows if matches(flt, m, t)}
        assert got == want, flt
        nonempty += bool(want) and len(want) < len(rows)
    assert nonempty > 100  # the random filters are selective, not trivial


@pytest.mark.parametrize(
    ("flt", "want"),
    [
        ({"tier": "pro"}, {1}),
        ({"price": {"$gte": 10}}, {1, 3}),
        ({"price": 10.0}, {1}),
        ({"flag": True}, {2}),
        ({"flag": 1}, set()),  # type-strict: a number never matches a bool
        ({"tier": {"$ne": "pro"}}, {2, 3}),
        ({"tier": {"$nin": ["pro", "team"]}}, {3}),
        ({"tier": {"$exists": False}}, {3}),
        ({"$or": [{"tier": "team"}, {"price": {"$lt": 20, "$gt": 10}}]}, {2}),
        ({"as_of": {"$gte": "2024-02-01"}}, {2, 3}),
        ({"as_of": {"$lt": "2024-02-01T00:00:00+00:00"}, "tier": "pro"}, {1}),
        ({}, {1, 2, 3}),
    ],
)
def test_filter_examples(flt: dict[str, Any], want: set[int]) -> None:
    rows = {
        1: ({"tier": "pro", "price": 10}, to_timestamp("2024-01-01")),
        2: ({"tier": "team", "flag": True, "price": 5}, to_timestamp("2024-03-01")),
        3: ({"price": 30}, to_timestamp("2025-01-01")),
    }
    assert {v for v, (m, t) in rows.items() if matches(flt, m, t)} == want
    con = sqlite3.connect(":memory:")
    con.execute("CREATE TABLE facts (vid INTEGER, metadata TEXT, valid_from REAL)")
    con.executemany(
        "INSERT INTO facts VALUES (?, ?, ?)", [(v, json.dumps(m), t) for v, (m, t) in rows.items()]
    )
    sql, params = compile_filter(flt)
    assert {r[0] for r in con.execute(f"SELECT vid FROM facts WHERE {sql}", params)} == want


@pytest.mark.parametrize(
    ("flt", "needle"),
    [
        ("tier = pro", "must be a dict"),
        ({"$nor": [{"a": 1}]}, "unknown filter key"),
        ({"tier": {"$regex": "p.*"}}, "unknown filter operator"),
        ({"tier": {"$in": "pro"}}, "needs a list"),
        ({"price": {"$gt": None}}, "needs a number or a string"),
        ({"tier": {}}, "must not be an empty dict"),
        ({"$or": []}, "non-empty list"),
        ({"as_of": {"$gte": "last tuesday"}}, "ISO-8601"),
        ({"tier": ["pro"]}, "a string, number, bool or None"),
    ],
)
def test_bad_filters_say_what_is_accepted(flt: Any, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        compile_filter(flt)
    with pytest.raises(ConfigError, match=needle):
        matches(flt, {"tier": "pro", "price": 1}, 0.0)
