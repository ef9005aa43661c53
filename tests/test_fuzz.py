"""Fuzzing bad input through the test views: never a 500, never a trace left behind.

Whatever arrives (any header value, any body, any method or path), the app
answers a 4xx problem or the view's own response; a rejected request stores
no key and runs nothing; a key is never replayed to another scope. Each
example runs in its own rolled-back transaction (hypothesis' Django TestCase),
so examples cannot see one another's keys.

The test views read their behaviour from the JSON body (``status``, ``raise``,
``big``, ...); generated bodies never carry those words, so every answer below
comes from the app or from the view doing its ordinary work.
"""

from __future__ import annotations

import json
import re
import string
from typing import Any
from urllib.parse import quote

import http_sf
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.http.response import HttpResponseBase
from django.test import Client
from hypothesis import HealthCheck, assume, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.extra.django import TestCase

from django_idempotency.exceptions import PROBLEM_BASE
from django_idempotency.models import IdempotencyKey
from tests.testapp.models import Order

KEY_MALFORMED = PROBLEM_BASE + "key-malformed"
MAX_KEY_LENGTH = 255
PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F))
OWS = " \t"
#: The testapp views act on these body fields; generated bodies avoid them.
VIEW_CONTROLS = re.compile(rb"status|raise|cookie|big|stream|item", re.IGNORECASE)

PLAIN, API_FUNCTION, VIEWSET = "/plain/", "/api/function/", "/api/viewset/"
ENDPOINTS = (PLAIN, API_FUNCTION, VIEWSET)
DRF_ENDPOINTS = (API_FUNCTION, VIEWSET)

fuzz = hypothesis_settings(
    max_examples=25,
    deadline=None,
    database=None,  # no example database written into the working tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: For the tests that send several requests per example.
fuzz_fewer = hypothesis_settings(fuzz, max_examples=15)


# Oracle -----------------------------------------------------------------------


class AnyOutcome:
    """An input the contract leaves open (an sf-string with parameters)."""


def expected_key(value: str) -> str | AnyOutcome | None:
    """The key DESIGN.md section 2 says ``value`` carries, or ``None`` if malformed.

    Bare keys are checked by the rule itself; quoted ones by http-sf, the
    reference Structured Fields parser.
    """
    value = value.strip(OWS)
    if value.startswith('"'):
        try:
            parsed, parameters = http_sf.parse(value.encode("ascii"), tltype="item")
        except (UnicodeEncodeError, http_sf.StructuredFieldError):
            return None
        if parameters:
            return AnyOutcome()
        value = parsed
    elif "," in value:
        return None  # two fields joined by the server: a list (see test_keys)
    if not 1 <= len(value) <= MAX_KEY_LENGTH or not set(value) <= set(PRINTABLE):
        return None
    return value


# Strategies -------------------------------------------------------------------


def _repeat(unit: str, length: int) -> str:
    return (unit * (length // len(unit) + 1))[:length]


def _quote_naively(text: str) -> str:
    return f'"{text}"'


printable_text = st.text(st.sampled_from(PRINTABLE), max_size=300)
#: Long values are built by repetition: cheap to generate up to 10 000.
long_text = st.builds(
    _repeat, st.text(min_size=1, max_size=8), st.integers(min_value=200, max_value=10_000)
)
header_values = st.one_of(
    printable_text,
    st.text(max_size=40),  # control characters, non-ASCII, everything
    long_text,
    st.builds(http_sf.ser, st.text(st.sampled_from(PRINTABLE), max_size=300)),
    st.builds(_quote_naively, st.text(max_size=40)),
    st.builds(
        lambda v, pad: pad + v + pad, printable_text, st.sampled_from(["", " ", "\t", " \t"])
    ),
    st.builds(
        lambda v, tail: v + tail,
        st.builds(_quote_naively, printable_text),
        st.sampled_from(['"', ";a=1", " x", "\\", ",b"]),
    ),
    st.sampled_from(["", '"', '""', " ", '"\\', '"a\\b"', '"\\"\\\\"']),
)
valid_keys = st.one_of(
    st.text(
        st.sampled_from(string.ascii_letters + string.digits + "-_."),
        min_size=1,
        max_size=MAX_KEY_LENGTH,
    ),
    st.builds(http_sf.ser, st.text(st.sampled_from(PRINTABLE), min_size=1, max_size=100)),
)

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=5)


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _huge(length: int) -> bytes:
    return b'{"padding": "' + b"x" * length + b'"}'


bodies = st.one_of(
    st.builds(lambda value: json.dumps(value).encode(), json_objects),
    st.builds(lambda value: json.dumps(value).encode(), json_values),
    st.binary(max_size=200),  # invalid JSON, binary, invalid UTF-8
    st.text(max_size=100).map(lambda text: text.encode("utf-16")),
    st.builds(_nested, st.integers(min_value=1, max_value=100_000)),
    # Around DATA_UPLOAD_MAX_MEMORY_SIZE (2.5 MiB), over which Django refuses.
    st.builds(_huge, st.sampled_from([1_000, 2_621_000, 2_621_440, 3_000_000])),
).filter(lambda body: not VIEW_CONTROLS.search(body))
content_types = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-16",
        "application/json; charset=bogus",
        "application/problem+json",
        "text/plain",
        "application/octet-stream",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=fuzz",
        "multipart/form-data",
        "",
    ]
)
methods = st.one_of(
    st.sampled_from(["GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE", "TRACE"]),
    st.text(st.sampled_from(string.ascii_uppercase), min_size=1, max_size=10),
)
paths = st.one_of(
    st.sampled_from([PLAIN, API_FUNCTION, VIEWSET, "/cbv/", "/optional/"]),
    st.builds(lambda n: f"{VIEWSET}{n}/", st.integers(min_value=0, max_value=2**31)),
    st.builds(lambda n: f"{VIEWSET}{n}/refund/", st.integers(min_value=0, max_value=2**31)),
    st.builds(
        lambda base, junk: base + quote(junk), st.sampled_from(ENDPOINTS), st.text(max_size=30)
    ),
)


# Helpers ----------------------------------------------------------------------


def post(
    client: Client,
    path: str,
    body: bytes = b"{}",
    *,
    content_type: str = "application/json",
    method: str = "POST",
    headers: dict[str, str] | None = None,
    **environ: str,
) -> HttpResponseBase:
    response: HttpResponseBase = client.generic(
        method, path, body, content_type=content_type, headers=headers, **environ
    )
    return response


def problem_type(response: HttpResponseBase) -> str | None:
    if response.get("Content-Type") != "application/problem+json":
        return None
    return str(json.loads(response.content)["type"])


def crashes_the_drf_test_views(body: bytes, content_type: str) -> bool:
    """Whether a body makes the DRF test views fail on their own, before or after the app.

    DRF's JSON parser lets a ``RecursionError`` through (a 500 of DRF's), and
    the test views expect a JSON object; neither is this app's to answer for.
    """
    if not content_type.startswith("application/json"):
        return False
    try:
        return not isinstance(json.loads(body), dict)
    except RecursionError:
        return True
    except ValueError:
        return False


def assert_nothing_stored() -> None:
    assert not IdempotencyKey.objects.exists()
    assert not Order.objects.exists()


def assert_executed_once(response: HttpResponseBase, key: str) -> None:
    assert response.status_code == 201, response.content
    assert "Idempotent-Replayed" not in response
    row = IdempotencyKey.objects.get()
    assert row.key == key
    assert bytes(row.response_body) == response.content
    assert Order.objects.count() == 1


# Tests ------------------------------------------------------------------------


class FuzzTestCase(TestCase):
    alice: AbstractBaseUser
    bob: AbstractBaseUser
    sessions: dict[int, str]

    @classmethod
    def setUpTestData(cls) -> None:
        users = get_user_model().objects
        cls.alice = users.create_user("alice", password="not-used")
        cls.bob = users.create_user("bob", password="not-used")
        # Logged in once per class: examples reuse the session cookies.
        cls.sessions = {}
        for user in (cls.alice, cls.bob):
            client = Client()
            client.force_login(user)
            cls.sessions[user.pk] = client.cookies[settings.SESSION_COOKIE_NAME].value

    def client_for(self, user: AbstractBaseUser | None) -> Client:
        client = Client()
        if user is not None:
            client.cookies[settings.SESSION_COOKIE_NAME] = self.sessions[user.pk]
        return client


class KeyHeaderTests(FuzzTestCase):
    @fuzz
    @given(value=header_values, path=st.sampled_from(ENDPOINTS))
    def test_any_header_value_is_a_key_or_a_400_problem(self, value: str, path: str) -> None:
        response = post(self.client_for(self.alice), path, headers={"Idempotency-Key": value})

        expected = expected_key(value)
        assert response.status_code < 500
        if isinstance(expected, AnyOutcome):
            assert response.status_code in (201, 400)
        elif expected is None:
            assert response.status_code == 400
            assert problem_type(response) == KEY_MALFORMED
            assert_nothing_stored()
        else:
            assert_executed_once(response, expected)

    @fuzz
    @given(raw=st.binary(max_size=300), path=st.sampled_from(ENDPOINTS))
    def test_raw_header_bytes_as_a_wsgi_server_passes_them(self, raw: bytes, path: str) -> None:
        # PEP 3333: header values reach the environ as latin-1 decoded str.
        value = raw.decode("latin-1")
        response = post(self.client_for(self.alice), path, HTTP_IDEMPOTENCY_KEY=value)

        expected = expected_key(value)
        assert response.status_code < 500
        if expected is None:
            assert response.status_code == 400
            assert problem_type(response) == KEY_MALFORMED
            assert_nothing_stored()
        elif not isinstance(expected, AnyOutcome):
            assert_executed_once(response, expected)
        if any(byte >= 0x80 for byte in raw):
            assert response.status_code == 400


class BodyTests(FuzzTestCase):
    @fuzz
    @given(body=bodies, content_type=content_types, path=st.sampled_from(ENDPOINTS))
    def test_any_body_gets_the_views_answer_or_a_4xx(
        self, body: bytes, content_type: str, path: str
    ) -> None:
        if path in DRF_ENDPOINTS:
            assume(not crashes_the_drf_test_views(body, content_type))
        response = post(
            self.client_for(self.alice),
            path,
            body,
            content_type=content_type,
            headers={"Idempotency-Key": "fuzz"},
        )

        assert response.status_code < 500, response.content[:500]
        if response.status_code == 201:
            assert_executed_once(response, "fuzz")
        else:
            # Django's 400 for an oversized body, DRF's 400 for unparseable
            # JSON, 415 for a media type it has no parser for: all refusals.
            assert response.status_code in (400, 413, 415)
            assert_nothing_stored()

    @fuzz_fewer
    @given(
        value=json_objects,
        reordered=st.randoms(use_true_random=False),
        indent=st.sampled_from([None, 0, 2]),
    )
    def test_the_same_json_in_another_form_replays_and_a_different_one_is_refused(
        self, value: dict[str, Any], reordered: Any, indent: int | None
    ) -> None:
        value = {
            name: item for name, item in value.items() if not VIEW_CONTROLS.search(name.encode())
        }
        client = self.client_for(self.alice)
        first = post(client, PLAIN, json.dumps(value).encode(), headers={"Idempotency-Key": "k"})
        names = list(value)
        reordered.shuffle(names)
        same = json.dumps({name: value[name] for name in names}, indent=indent).encode()
        replay = post(client, PLAIN, same, headers={"Idempotency-Key": "k"})
        different = json.dumps({**value, "nonce": len(value)}).encode()
        mismatch = post(client, PLAIN, different, headers={"Idempotency-Key": "k"})

        assert first.status_code == 201
        assert replay.status_code == 201
        assert replay["Idempotent-Replayed"] == "true"
        assert replay.content == first.content
        assert mismatch.status_code == 422
        assert Order.objects.count() == IdempotencyKey.objects.count() == 1


class MethodAndPathTests(FuzzTestCase):
    @fuzz
    @given(method=methods, path=paths, key=st.one_of(st.none(), valid_keys))
    def test_any_method_and_path_never_fails_nor_stores_a_refusal(
        self, method: str, path: str, key: str | None
    ) -> None:
        headers = {} if key is None else {"Idempotency-Key": key}
        response = post(self.client_for(self.alice), path, method=method, headers=headers)

        assert response.status_code < 500
        rows = list(IdempotencyKey.objects.all())
        if method in ("GET", "HEAD", "OPTIONS", "TRACE") or response.status_code in (404, 405):
            assert rows == []
        for row in rows:
            assert (row.method, row.path) == (method, path)
            assert row.response_status == response.status_code


class ScopeTests(FuzzTestCase):
    @fuzz_fewer
    @given(key=valid_keys, path=st.sampled_from(ENDPOINTS))
    def test_a_key_is_never_replayed_to_another_user(self, key: str, path: str) -> None:
        alice, bob = self.client_for(self.alice), self.client_for(self.bob)
        headers = {"Idempotency-Key": key}

        alices = post(alice, path, headers=headers)
        bobs = post(bob, path, headers=headers)
        alices_again = post(alice, path, headers=headers)

        assert (alices.status_code, bobs.status_code) == (201, 201)
        assert "Idempotent-Replayed" not in bobs
        assert bobs.content != alices.content  # another order
        assert alices_again["Idempotent-Replayed"] == "true"
        assert alices_again.content == alices.content
        assert Order.objects.count() == 2
        scopes = set(IdempotencyKey.objects.values_list("scope", flat=True))
        assert scopes == {f"user:{self.alice.pk}", f"user:{self.bob.pk}"}

    @fuzz_fewer
    @given(key=valid_keys)
    def test_anonymous_requests_never_see_a_users_response(self, key: str) -> None:
        headers = {"Idempotency-Key": key}

        users = post(self.client_for(self.alice), PLAIN, headers=headers)
        anonymous = post(self.client_for(None), PLAIN, headers=headers)

        assert (users.status_code, anonymous.status_code) == (201, 201)
        assert "Idempotent-Replayed" not in anonymous
        assert anonymous.content != users.content
        assert IdempotencyKey.objects.count() == 2


class NestingTests(FuzzTestCase):
    @fuzz
    @given(depth=st.integers(min_value=500, max_value=200_000))
    def test_deeply_nested_json_is_hashed_not_crashed_on(self, depth: int) -> None:
        response = post(self.client_for(self.alice), PLAIN, _nested(depth),
                        headers={"Idempotency-Key": "deep"})  # fmt: skip

        assert response.status_code == 201
        assert_executed_once(response, "deep")
