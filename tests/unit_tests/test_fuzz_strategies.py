"""What the fuzz tests generate (shared by every ``test_fuzz_*`` module), and checks that the
generators really reach the edge cases they are meant to reach.

``UNDERSTUDY_FUZZ_EXAMPLES`` sets the number of generated cases per property: unset, CI runs a
small fixed (derandomised) budget; ``bench/fuzz.py`` sets thousands and explores at random.
"""

from __future__ import annotations

import json
import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

_BUDGET = os.environ.get("UNDERSTUDY_FUZZ_EXAMPLES")


def fuzz_settings(ci_examples: int) -> settings:
    """Hypothesis settings: ``ci_examples`` cases in CI, ``UNDERSTUDY_FUZZ_EXAMPLES`` when set."""
    return settings(
        max_examples=int(_BUDGET) if _BUDGET else ci_examples,
        deadline=None,
        database=None,
        derandomize=_BUDGET is None,  # CI explores the same cases every run
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.filter_too_much,
        ],
    )


#: Code points that break text handling: lone surrogates, NUL, BOM, bidi and zero-width marks,
#: line separators, a combining mark, non-characters, astral emoji.
EDGE_CHARS = "\ud800\udbff\udc00\udfff\x00\ufeff\u202e\u200b\u2028\u0301\uffff\U0010ffff😀\r\n\t"
#: Any code point, lone surrogates included (Hypothesis leaves them out by default), and short
#: strings made mostly of the edge cases.
any_text = st.text(st.characters(exclude_categories=()), max_size=40) | st.text(
    st.sampled_from(EDGE_CHARS + "ab "), max_size=8
)
#: Text a caller may legitimately send: every code point but the surrogates.
valid_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40) | st.text(
    st.sampled_from(EDGE_CHARS[4:] + "ab "), max_size=8
)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | any_text
    | st.sampled_from([2**63, -(2**63) - 1, 10**400, 1e308, -0.0])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=12,
)


def nested(depth: int, kind: str) -> str:
    """JSON text nested ``depth`` levels deep (built as text: ``json.dumps`` would recurse)."""
    if kind == "list":
        return "[" * depth + "1" + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


#: Deeply nested JSON text (up to 6,000 levels) of arrays or objects.
nested_json = st.builds(nested, st.integers(0, 6000), st.sampled_from(["list", "dict"]))


def encode(obj: Any) -> bytes:
    """JSON as a client sends it: ASCII, lone surrogates as ``\\u`` escapes, NaN allowed."""
    return json.dumps(obj, ensure_ascii=True, allow_nan=True).encode("ascii")


def paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into a JSON value (the value itself first)."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += paths(v, (*prefix, i))
    return out


def mutate(draw: st.DrawFn, obj: Any, most: int = 3) -> Any:
    """Replace or remove up to ``most`` values anywhere inside ``obj`` (in place; sometimes none),
    so every depth of wrongness is reached from a well-formed value."""
    for _ in range(draw(st.sampled_from([0, 0, 0, *range(1, most + 1)]))):
        inner = paths(obj)[1:]
        if not inner:
            break
        path = draw(st.sampled_from(inner))
        parent = obj
        for step in path[:-1]:
            parent = parent[step]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_values)
    return obj


#: Bytes that are not UTF-8 text: invalid sequences, overlong forms, UTF-16, NUL, a BOM.
broken_bytes = st.binary(max_size=200) | st.sampled_from(
    [
        b"\xff\xfe",
        b"\xc3\x28",
        b"\xed\xa0\x80",  # an encoded surrogate
        b"\xc0\xaf",  # overlong "/"
        "text".encode("utf-16"),
        b"\x00" * 8,
        b"\xef\xbb\xbf",
        b"caf\xe9",  # latin-1
    ]
)


# -- the generators reach what they are for -----------------------------------------------------


def _has_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in text)


@settings(max_examples=300, database=None, derandomize=True)
@given(text=any_text)
def test_any_text_is_strings(text: str) -> None:
    assert isinstance(text, str)


def test_any_text_reaches_lone_surrogates_and_valid_text_never_does() -> None:
    seen: list[bool] = []

    @settings(max_examples=300, database=None, derandomize=True)
    @given(a=any_text, v=valid_text)
    def collect(a: str, v: str) -> None:
        assert not _has_surrogate(v)
        seen.append(_has_surrogate(a))

    collect()
    assert sum(seen) >= 10  # a few percent of the cases, at least


def test_nested_json_reaches_past_the_recursion_limit() -> None:
    depths: list[int] = []

    @settings(max_examples=200, database=None, derandomize=True)
    @given(text=nested_json)
    def collect(text: str) -> None:
        depths.append(text.count("[") + text.count("{"))

    collect()
    assert max(depths) > 1000 and min(depths) < 64


def test_mutate_keeps_most_values_and_changes_some() -> None:
    changed: list[bool] = []
    original = {"messages": [{"role": "user", "content": "hi"}], "n": 1}

    @settings(max_examples=200, database=None, derandomize=True)
    @given(data=st.data())
    def collect(data: st.DataObject) -> None:
        obj = json.loads(json.dumps(original))
        changed.append(data.draw(st.composite(lambda d: mutate(d, obj))()) != original)

    collect()
    assert 0 < sum(changed) < len(changed)  # both well-formed and broken values come out
