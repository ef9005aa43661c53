"""Request fingerprints: method, path with query, and the body, JSON canonicalised."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client, RequestFactory

from django_idempotency.fingerprints import canonical_json, request_body, request_fingerprint
from tests.conftest import Endpoint, send

factory = RequestFactory()


def fingerprint(method: str, path: str, body: bytes | str, content_type: str) -> str:
    return request_fingerprint(factory.generic(method, path, body, content_type=content_type))


def test_fingerprint_is_a_sha256_hex_digest() -> None:
    value = fingerprint("POST", "/orders/", b"{}", "application/json")
    assert len(value) == 64
    assert int(value, 16) >= 0


def test_same_request_same_fingerprint() -> None:
    assert fingerprint("POST", "/o/?a=1", b"x", "text/plain") == fingerprint(
        "POST", "/o/?a=1", b"x", "text/plain"
    )


@pytest.mark.parametrize(
    "other",
    [
        ("PATCH", "/o/?a=1", b'{"a": 1}'),
        ("POST", "/p/?a=1", b'{"a": 1}'),
        ("POST", "/o/?a=2", b'{"a": 1}'),
        ("POST", "/o/", b'{"a": 1}'),
        ("POST", "/o/?a=1", b'{"a": 2}'),
        ("POST", "/o/?a=1", b'{"a": "1"}'),
        ("POST", "/o/?a=1", b'[{"a": 1}]'),
    ],
)
def test_method_path_query_and_body_all_count(other: tuple[str, str, bytes]) -> None:
    base = fingerprint("POST", "/o/?a=1", b'{"a": 1}', "application/json")
    assert fingerprint(*other, "application/json") != base


def test_fields_are_separated_so_they_cannot_run_into_each_other() -> None:
    assert fingerprint("POST", "/ab", b"c", "text/plain") != fingerprint(
        "POST", "/a", b"bc", "text/plain"
    )


@pytest.mark.parametrize(
    "body",
    [
        '{"b": [1, 2, {"y": null, "x": true}], "a": "\\u00e9"}',
        '{"a":"\u00e9","b":[1,2,{"x":true,"y":null}]}',
        '\n{ "a" : "\u00e9" ,\t"b" : [ 1 , 2 , { "x" : true , "y" : null } ] }\n',
    ],
)
@pytest.mark.parametrize("content_type", ["application/json", "application/problem+json"])
def test_json_key_order_whitespace_and_escapes_do_not_matter(body: str, content_type: str) -> None:
    reference = '{"a": "\u00e9", "b": [1, 2, {"x": true, "y": null}]}'
    assert fingerprint("POST", "/o/", body.encode(), content_type) == fingerprint(
        "POST", "/o/", reference.encode(), "application/json"
    )


def test_json_array_order_matters() -> None:
    assert fingerprint("POST", "/o/", b"[1, 2]", "application/json") != fingerprint(
        "POST", "/o/", b"[2, 1]", "application/json"
    )


@pytest.mark.parametrize("body", [b'{"a": 1', b"\xff\xfe{}", b"", b"not json"])
def test_invalid_json_is_hashed_raw(body: bytes) -> None:
    request = factory.post("/o/", body, content_type="application/json")
    assert request_body(request) == body
    expected = hashlib.sha256(b"POST\n/o/\n" + body).hexdigest()
    assert request_fingerprint(request) == expected


def test_other_content_types_are_hashed_raw() -> None:
    request = factory.post("/o/", '{"b": 1, "a": 2}', content_type="text/plain")
    assert request_body(request) == b'{"b": 1, "a": 2}'


def test_canonical_json_is_compact_sorted_utf8() -> None:
    assert canonical_json({"b": 1, "a": ["\u00e9"]}) == '{"a":["\u00e9"],"b":1}'.encode()


def _multipart(name: str = "receipt.txt") -> Any:
    return factory.post(
        "/o/",
        {"item": ["b", "a"], "note": "x", "file": SimpleUploadedFile(name, b"data", "text/plain")},
    )


def test_multipart_already_read_falls_back_to_the_parsed_form() -> None:
    read_first = _multipart()
    assert read_first.POST["note"] == "x"  # reading POST consumes the stream

    fingerprint_after_read = request_fingerprint(read_first)
    again = _multipart()
    again.POST  # noqa: B018 - parse it, like the CSRF middleware would
    assert request_fingerprint(again) == fingerprint_after_read


def test_parsed_form_fallback_tells_different_forms_apart() -> None:
    one, other = _multipart("a.txt"), _multipart("b.txt")
    one.POST  # noqa: B018
    other.POST  # noqa: B018
    assert request_fingerprint(one) != request_fingerprint(other)


@pytest.mark.django_db
@pytest.mark.urls("tests.testapp.urls")
def test_fingerprint_per_view_can_ignore_fields(client: Client) -> None:
    endpoint = Endpoint("item-fingerprint", "POST", "/variants/item-fingerprint/", drf=False)
    send(client, endpoint, {"item": "widget", "sent_at": 1})
    replay = send(client, endpoint, {"item": "widget", "sent_at": 2})
    mismatch = send(client, endpoint, {"item": "gadget", "sent_at": 2})

    assert replay["Idempotent-Replayed"] == "true"
    assert mismatch.status_code == 422


@pytest.mark.django_db
def test_fingerprint_setting(client: Client, settings: Any) -> None:
    settings.IDEMPOTENCY_FINGERPRINT = "tests.testapp.variants.item_fingerprint"
    endpoint = Endpoint("plain", "POST", "/plain/", drf=False)
    send(client, endpoint, {"item": "widget", "sent_at": 1})
    assert send(client, endpoint, {"item": "widget", "sent_at": 2})["Idempotent-Replayed"] == "true"


def _multipart_with_boundary(boundary: str, content: bytes) -> Any:
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="doc"; filename="a.txt"\r\n'
            f"Content-Type: text/plain\r\n\r\n"
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return RequestFactory().post(
        "/upload/", body, content_type=f"multipart/form-data; boundary={boundary}"
    )


def test_multipart_retry_with_a_new_boundary_has_the_same_fingerprint() -> None:
    first = _multipart_with_boundary("boundaryAAAA", b"file body")
    retry = _multipart_with_boundary("boundaryBBBB", b"file body")
    assert first.body != retry.body
    assert request_fingerprint(first) == request_fingerprint(retry)


def test_multipart_files_count_by_content_and_stay_readable() -> None:
    request = _multipart_with_boundary("b1", b"one")
    assert request_fingerprint(request) != request_fingerprint(
        _multipart_with_boundary("b1", b"two")
    )
    assert request.FILES["doc"].read() == b"one"
