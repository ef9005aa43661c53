"""Parsing the Idempotency-Key header: bare and Structured-Field string forms."""

from __future__ import annotations

import string

import http_sf
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from django_idempotency.exceptions import KeyMalformed
from django_idempotency.keys import MAX_KEY_LENGTH, parse_key

PRINTABLE = [chr(c) for c in range(0x20, 0x7F)]


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ("abc", "abc"),
        ('"abc"', "abc"),
        ("  abc\t", "abc"),
        ('\t"abc" ', "abc"),
        ('"a\\"b"', 'a"b'),
        ('"a\\\\b"', "a\\b"),
        ('"a b"', "a b"),
        ("a b", "a b"),
        ("9f1c-4e0b", "9f1c-4e0b"),
        ('a"b', 'a"b'),  # bare keys may hold quotes anywhere but first
        ("k" * MAX_KEY_LENGTH, "k" * MAX_KEY_LENGTH),
        ('"' + "k" * MAX_KEY_LENGTH + '"', "k" * MAX_KEY_LENGTH),
        ("~!#$%&'()*+-./:;<=>?@[]^_`{|}", "~!#$%&'()*+-./:;<=>?@[]^_`{|}"),
        ('"a,b"', "a,b"),  # a comma inside an sf-string is part of the key
    ],
)
def test_valid_keys(value: str, key: str) -> None:
    assert parse_key(value) == key


@pytest.mark.parametrize(
    "value",
    [
        "",
        " \t ",
        '""',
        "k" * (MAX_KEY_LENGTH + 1),
        '"' + "k" * (MAX_KEY_LENGTH + 1) + '"',
        "cl\u00e9",
        "\u2603",
        "a\x00b",
        "a\nb",
        "a\x7f",
        '"abc',
        '"',
        '"abc\\"',
        '"a\\nb"',
        '"abc"x',
        '"abc";p=1',
        '"a\u00e9"',
        '"a\tb"',
        # Two Idempotency-Key fields, joined by the server (RFC 9110, 5.3).
        "a1,a2",
        "a1, a2",
        '"a1","a2"',
        '"a1", "a2"',
        'a1,"a2"',
        "a1,",
        ",a1",
    ],
)
def test_malformed_keys(value: str) -> None:
    with pytest.raises(KeyMalformed):
        parse_key(value)


def _strip_ows(value: str) -> str:
    # An HTTP parser hands a field value over without leading and trailing
    # SP/HTAB (RFC 9110, section 5.5); http_sf expects it so.
    return value.strip(" \t")


# Header values as a WSGI server hands them over: latin-1 text.
header_values = st.text(alphabet=st.characters(max_codepoint=0xFF), max_size=300)
quoted_values = st.builds(
    lambda inner, tail: '"' + inner + tail,
    st.text(alphabet=st.characters(max_codepoint=0xFF), max_size=280),
    st.sampled_from(['"', "", '";a=1', '"x', '\\"', "\\", '"  ']),
)


@given(st.one_of(header_values, quoted_values))
@example('"abc"')
@example('"a\\"b"')
@example('"' + "k" * 256 + '"')
@example('""')
@example('"abc" ')
def test_quoted_keys_agree_with_the_http_sf_reference_parser(value: str) -> None:
    try:
        ours: str | KeyMalformed = parse_key(value)
    except KeyMalformed as error:
        ours = error  # any other exception fails the test

    stripped = _strip_ows(value)
    if not stripped.startswith('"'):
        return  # a bare key: no Structured Field to compare with
    try:
        reference = http_sf.parse(stripped.encode("latin-1"), tltype="item")
    except http_sf.StructuredFieldError:
        assert isinstance(ours, KeyMalformed), f"{value!r} is no sf-string, we read {ours!r}"
        return
    item, parameters = reference
    if isinstance(item, str) and not parameters and 1 <= len(item) <= MAX_KEY_LENGTH:
        assert ours == item
    else:
        assert isinstance(ours, KeyMalformed)


@given(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1))
def test_every_printable_key_round_trips_through_its_serialised_form(key: str) -> None:
    serialised = http_sf.ser(key)
    if len(key) <= MAX_KEY_LENGTH:
        assert parse_key(serialised) == key
        if not key.startswith('"') and "," not in key:
            assert parse_key(key) == key
    else:
        with pytest.raises(KeyMalformed):
            parse_key(serialised)


@given(st.text(max_size=400))
def test_any_text_is_a_key_or_malformed_never_an_error(value: str) -> None:
    try:
        key = parse_key(value)
    except KeyMalformed:
        return
    assert 1 <= len(key) <= MAX_KEY_LENGTH
    assert all(0x20 <= ord(char) <= 0x7E for char in key)


@given(
    st.lists(
        st.one_of(
            st.text(st.sampled_from(string.ascii_letters + string.digits + "-_.*"), min_size=1),
            st.builds(http_sf.ser, st.text(st.sampled_from(PRINTABLE), max_size=20)),
        ),
        min_size=2,
        max_size=4,
    ),
    st.sampled_from([",", ", ", " ,\t"]),
)
def test_a_list_of_keys_is_malformed_as_http_sf_reads_it(members: list[str], joiner: str) -> None:
    value = joiner.join(members)
    try:
        parsed = http_sf.parse(value.encode("ascii"), tltype="list")
    except http_sf.StructuredFieldError:
        parsed = None  # bare members that are no sf-tokens: still a joined list
    assert parsed is None or len(parsed) == len(members)
    with pytest.raises(KeyMalformed):
        parse_key(value)
