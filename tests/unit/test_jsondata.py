"""Property tests for :func:`batchframework.jsondata.encode_json`, the check every operation's
``input_data`` and ``output_data`` passes before anything is written. No database needed."""

from __future__ import annotations

import datetime
import decimal
import json
import re
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchframework.exceptions import InputDataError, InvalidOperationError
from batchframework.jsondata import MAX_DEPTH, encode_json

# Text every supported database stores unchanged: no NUL (PostgreSQL's jsonb refuses
# \u0000), and no lone surrogates (not encodable as UTF-8).
json_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"))

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    json_text,
)

json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(json_text, children, max_size=5),
    ),
    max_leaves=30,
)

not_json_leaves = st.one_of(
    st.datetimes(),
    st.dates(),
    st.times(),
    st.decimals(allow_nan=False),
    st.uuids(),
    st.binary(),
    st.sets(st.integers(), max_size=3),
    st.frozensets(st.integers(), max_size=3),
    st.complex_numbers(),
    st.builds(object),
    st.just(float("nan")),
    st.just(float("inf")),
    st.just(float("-inf")),
    # Keys JSON would silently turn into strings, so the value would not come back as it was.
    st.dictionaries(st.integers(), json_scalars, min_size=1, max_size=3),
    st.dictionaries(st.sampled_from([None, True, 1.5]), json_scalars, min_size=1, max_size=3),
    # Strings no supported database stores as they are.
    st.tuples(json_text, json_text).map(lambda parts: "\x00".join(parts)),
    st.sampled_from(["\ud800", "a\udfffb", "\ud83d\ude00"]),
    st.tuples(json_text, json_text).map(lambda parts: {"\x00".join(parts): 1}),
)


@st.composite
def with_bad_leaf_inside(draw) -> object:
    """A JSON structure with one non-JSON value somewhere inside it (or at the top)."""
    value = draw(not_json_leaves)
    for _level in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["list", "tuple", "dict"]))
        if kind != "dict":
            siblings = draw(st.lists(json_values, max_size=3))
            siblings.insert(draw(st.integers(0, len(siblings))), value)
            value = siblings if kind == "list" else tuple(siblings)  # json.dumps takes tuples
        else:
            container = draw(st.dictionaries(json_text, json_values, max_size=3))
            container[draw(json_text)] = value
            value = container
    return value


def utf8_json_size(value: object) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def reported_size(error: InputDataError) -> int:
    match = re.search(r"is (\d+) bytes", str(error))
    assert match, str(error)
    return int(match.group(1))


@given(json_values)
def test_every_json_value_round_trips(value):
    text = encode_json(value)
    assert isinstance(text, str)
    assert json.loads(text) == value


@given(json_values)
def test_the_encoding_is_strict_json(value):
    # No NaN/Infinity constants, which PostgreSQL's jsonb and strict parsers refuse.
    assert json.loads(encode_json(value), parse_constant=pytest.fail) == value


@given(with_bad_leaf_inside())
def test_non_json_values_are_refused(value):
    with pytest.raises(InputDataError):
        encode_json(value)


@given(with_bad_leaf_inside(), st.sampled_from(["input_data", "output_data", "handler value"]))
def test_the_error_names_what_was_refused_and_is_an_invalid_operation(value, what):
    with pytest.raises(InputDataError, match=what) as excinfo:
        encode_json(value, what=what)
    assert isinstance(excinfo.value, InvalidOperationError)
    assert isinstance(excinfo.value, ValueError)


@given(json_values)
def test_the_size_limit_is_a_sharp_threshold_at_the_reported_size(value):
    with pytest.raises(InputDataError, match="MAX_INPUT_BYTES") as excinfo:
        encode_json(value, max_bytes=0)
    size = reported_size(excinfo.value)
    # Counted in bytes of JSON text, never fewer than its compact UTF-8 encoding has.
    assert size >= utf8_json_size(value)
    assert json.loads(encode_json(value, max_bytes=size)) == value
    assert json.loads(encode_json(value, max_bytes=size + 1)) == value
    with pytest.raises(InputDataError, match=f"limit of {size - 1} bytes"):
        encode_json(value, max_bytes=size - 1)


@given(with_bad_leaf_inside())
def test_refusal_comes_before_the_size_limit(value):
    # Whatever the limit, a non-JSON value is refused as such, never as merely too large.
    with pytest.raises(InputDataError) as excinfo:
        encode_json(value, max_bytes=1)
    assert "MAX_INPUT_BYTES" not in str(excinfo.value)


def test_no_limit_without_max_bytes():
    big = {"rows": ["x" * 1000] * 2000}
    assert json.loads(encode_json(big)) == big


@pytest.mark.parametrize(
    "value",
    [
        datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC),
        decimal.Decimal("1.10"),
        uuid.UUID(int=1),
        object(),
        float("nan"),
        {"k": {"nested": [1, 2, {3, 4}]}},
        {1: "int key"},
        "nul \x00 char",
        "lone \ud800 surrogate",
        ({"in a tuple": "nul \x00 char"},),
        [("x", {1: "int key"})],
    ],
)
def test_examples_of_refused_values(value):
    with pytest.raises(InputDataError, match="input_data"):
        encode_json(value)


def test_circular_structures_are_refused():
    value: list = []
    value.append(value)
    with pytest.raises(InputDataError):
        encode_json(value)


def test_too_deeply_nested_structures_are_refused_not_crashing():
    value: list = []
    for _ in range(100_000):
        value = [value]
    with pytest.raises(InputDataError):
        encode_json(value)


def nested(depth: int, kind: str) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value] if kind == "list" else {"k": value}
    return value


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_nesting_deeper_than_mariadb_stores_is_refused(kind):
    assert MAX_DEPTH == 31  # MariaDB's JSON_VALID refuses 32 levels
    assert json.loads(encode_json(nested(MAX_DEPTH, kind))) == nested(MAX_DEPTH, kind)
    with pytest.raises(InputDataError, match="more than 31 levels deep"):
        encode_json(nested(MAX_DEPTH + 1, kind))
    # Depth is nesting, not size: many containers side by side are fine.
    wide = [nested(MAX_DEPTH - 1, kind) for _ in range(100)]
    assert json.loads(encode_json(wide)) == wide
