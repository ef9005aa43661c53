"""Request fingerprints: method, path with query, and the body, JSON canonicalised."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client, RequestFactory

from django_idempotency.fingerprints import canonical_json, request_body, request_fingerprint
from tests.conftest import ENDPOINTS, Endpoint, send
from tests.testapp.models import Order

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
        "POST", "/o/", reference.encode(), content_type
    )


def test_json_array_order_matters() -> None:
    assert fingerprint("POST", "/o/", b"[1, 2]", "application/json") != fingerprint(
        "POST", "/o/", b"[2, 1]", "application/json"
    )


@pytest.mark.parametrize("body", [b'{"a": 1', b"\xff\xfe{}", b"", b"not json"])
def test_invalid_json_is_hashed_raw(body: bytes) -> None:
    request = factory.post("/o/", body, content_type="application/json")
    assert request_body(request) == body
    # (Django's test client sends no content type with an empty body.)
    head = f"POST\n/o/\n{request.content_type}\nbytes\n".encode()
    assert request_fingerprint(request) == hashlib.sha256(head + body).hexdigest()


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


# The media type and the kind of body count -------------------------------------------


def test_the_media_type_counts_so_a_form_is_not_the_same_bytes_as_text() -> None:
    body = b"item=widget"
    assert fingerprint("POST", "/o/", body, "application/x-www-form-urlencoded") != fingerprint(
        "POST", "/o/", body, "text/plain"
    )


def test_media_type_parameters_and_case_do_not_count() -> None:
    assert fingerprint("POST", "/o/", b"x", "Text/Plain; charset=utf-8") == fingerprint(
        "POST", "/o/", b"x", "text/plain"
    )


def test_a_json_body_mirroring_a_multipart_form_is_not_the_same_request() -> None:
    form = _multipart_with_boundary("b1", b"file body")
    mirror = RequestFactory().post(
        "/upload/", request_body(_multipart_with_boundary("b2", b"file body")), "application/json"
    )
    assert request_fingerprint(form) != request_fingerprint(mirror)


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("0.1", "0.10000000000000001"),
        ("1e400", "2e400"),
        ("12345678901234567890123", "12345678901234567890124"),
        ("1", "-1"),
        ("NaN", "Infinity"),
    ],
)
def test_json_numbers_are_compared_by_exact_decimal_value(one: str, other: str) -> None:
    assert fingerprint("POST", "/o/", f'{{"n": {one}}}', "application/json") != fingerprint(
        "POST", "/o/", f'{{"n": {other}}}', "application/json"
    )


@pytest.mark.parametrize("same", ["1", "1.0", "1.000", "10e-1", "0.1E1", "1e0"])
def test_json_numbers_of_equal_value_are_the_same(same: str) -> None:
    assert fingerprint("POST", "/o/", f"[{same}]", "application/json") == fingerprint(
        "POST", "/o/", "[1]", "application/json"
    )


def test_json_zero_has_one_form() -> None:
    assert fingerprint("POST", "/o/", "[-0.0]", "application/json") == fingerprint(
        "POST", "/o/", "[0]", "application/json"
    )


def test_deeply_nested_json_is_hashed_raw_without_error() -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    request = factory.post("/o/", body, content_type="application/json")
    assert request_body(request) == body
    assert len(request_fingerprint(request)) == 64


# DRF's Request: its content_type carries the header's parameters ---------------------


def drf_request(request: Any) -> Any:
    from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
    from rest_framework.request import Request

    return Request(request, parsers=[JSONParser(), FormParser(), MultiPartParser()])


def test_drf_json_with_a_charset_and_reordered_keys_is_the_same_request() -> None:
    from rest_framework.test import APIRequestFactory

    api = APIRequestFactory()
    first = api.post("/o/", b'{"a": 1, "b": [2]}', content_type="application/json")
    retry = api.post("/o/", b'{ "b": [2], "a": 1 }', content_type="application/json; charset=utf-8")
    assert request_fingerprint(drf_request(first)) == request_fingerprint(drf_request(retry))
    assert request_fingerprint(drf_request(first)) == request_fingerprint(first)


def test_drf_multipart_retry_with_a_new_boundary_is_the_same_request() -> None:
    first = drf_request(_multipart_with_boundary("boundaryAAAA", b"file body"))
    retry = drf_request(_multipart_with_boundary("boundaryBBBB", b"file body"))
    assert request_fingerprint(first) == request_fingerprint(retry)
    assert request_fingerprint(first) != request_fingerprint(
        drf_request(_multipart_with_boundary("boundaryCCCC", b"other body"))
    )
    assert retry.data["note"] == "hello"
    assert retry.FILES["doc"].read() == b"file body"


def test_drf_multipart_from_the_api_request_factory() -> None:
    from rest_framework.test import APIRequestFactory

    def build(content: bytes) -> Any:
        upload = SimpleUploadedFile("a.txt", content, "text/plain")
        return drf_request(APIRequestFactory().post("/o/", {"n": "1", "doc": upload}))

    assert request_fingerprint(build(b"x")) == request_fingerprint(build(b"x"))
    assert request_fingerprint(build(b"x")) != request_fingerprint(build(b"y"))


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"item=widget&n=1", "application/x-www-form-urlencoded"),
        (b"plain words", "text/plain"),
        (b'{"a": 1', "application/json"),
    ],
)
def test_drf_and_django_requests_agree(body: bytes, content_type: str) -> None:
    from rest_framework.test import APIRequestFactory

    django_request = factory.post("/o/", body, content_type=content_type)
    api_request = APIRequestFactory().post(
        "/o/", body, content_type=f"{content_type}; charset=utf-8"
    )
    assert request_fingerprint(drf_request(api_request)) == request_fingerprint(django_request)


# End to end over HTTP, per DRF entry point -------------------------------------------

DRF_ENDPOINTS = [e for e in ENDPOINTS if e.drf and e.method == "POST"]


def _multipart_body(boundary: str) -> bytes:
    return (
        f'--{boundary}\r\nContent-Disposition: form-data; name="item"\r\n\r\nwidget\r\n'
        f"--{boundary}--\r\n"
    ).encode()


@pytest.mark.django_db
@pytest.mark.parametrize("endpoint", [*DRF_ENDPOINTS, ENDPOINTS[0], ENDPOINTS[1]], ids=str)
def test_multipart_retry_with_a_new_boundary_replays(
    user_client: Client, endpoint: Endpoint
) -> None:
    responses = [
        user_client.post(
            endpoint.path,
            _multipart_body(boundary),
            content_type=f"multipart/form-data; boundary={boundary}",
            headers={"Idempotency-Key": "multipart"},
        )
        for boundary in ("----curlAAAA", "----curlBBBB")
    ]
    assert [r.status_code for r in responses] == [201, 201]
    assert responses[1]["Idempotent-Replayed"] == "true"
    assert Order.objects.count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize("endpoint", DRF_ENDPOINTS, ids=str)
def test_json_retry_with_a_charset_and_reordered_keys_replays(
    user_client: Client, endpoint: Endpoint
) -> None:
    first = user_client.post(
        endpoint.path,
        b'{"item": "widget", "n": 1}',
        content_type="application/json",
        headers={"Idempotency-Key": "json"},
    )
    retry = user_client.post(
        endpoint.path,
        b'{"n": 1.0, "item": "widget"}',
        content_type="application/json; charset=utf-8",
        headers={"Idempotency-Key": "json"},
    )
    assert (first.status_code, retry.status_code) == (201, 201)
    assert retry["Idempotent-Replayed"] == "true"
    assert Order.objects.count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize("endpoint", DRF_ENDPOINTS, ids=str)
def test_multipart_over_the_memory_limit_is_accepted_like_unprotected(
    user_client: Client, endpoint: Endpoint, settings: Any
) -> None:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1024
    body = (
        (
            b'--bb\r\nContent-Disposition: form-data; name="item"\r\n\r\nwidget\r\n'
            b'--bb\r\nContent-Disposition: form-data; name="doc"; filename="big.bin"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n"
        )
        + b"x" * 4096
        + b"\r\n--bb--\r\n"
    )
    response = user_client.post(
        endpoint.path,
        body,
        content_type="multipart/form-data; boundary=bb",
        headers={"Idempotency-Key": "big"},
    )
    assert response.status_code == 201, response.content[:200]
    assert Order.objects.get().item == "widget"
