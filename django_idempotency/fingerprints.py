"""Request fingerprints: what makes two requests with one key "the same"."""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.core.files.uploadedfile import UploadedFile
from django.http import HttpRequest
from django.http.request import RawPostDataException


def request_fingerprint(request: HttpRequest) -> str:
    """SHA-256 of the method, the path with its query string, and the body.

    JSON bodies are canonicalised, so key order and white space do not matter.
    """
    digest = hashlib.sha256()
    digest.update(request.method.encode() if request.method else b"")
    digest.update(b"\n")
    digest.update(request.get_full_path().encode())
    digest.update(b"\n")
    digest.update(request_body(request))
    return digest.hexdigest()


def request_body(request: HttpRequest) -> bytes:
    """The body in canonical form, for hashing."""
    if request.content_type == "multipart/form-data":
        # Clients draw a new random boundary for every request they build, so
        # a retry's raw bytes differ: hash the parsed fields and files instead.
        # Read the body first where Django allows it: parsing the form would
        # otherwise consume the stream and take request.body from the view.
        with contextlib.suppress(RawPostDataException, RequestDataTooBig):
            request.body  # noqa: B018  (cached on the request)
        return _parsed_form(request)
    try:
        body = request.body
    except RawPostDataException:
        # Read as a stream by the time we see it: hash what was parsed from it.
        return _parsed_form(request)
    if _is_json(request.content_type):
        try:
            return canonical_json(json.loads(body))
        except (ValueError, RecursionError):
            # Not valid JSON (or nested too deep to decode): the raw bytes
            # stand for themselves. UnicodeDecodeError is a ValueError.
            pass
    return body


def canonical_json(value: Any) -> bytes:
    """Serialise ``value`` with sorted keys and no insignificant white space."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    return content_type == "application/json" or content_type.endswith("+json")


def _parsed_form(request: HttpRequest) -> bytes:
    fields = sorted((name, request.POST.getlist(name)) for name in request.POST)
    files = sorted(
        (name, [_file_digest(f) for f in request.FILES.getlist(name)]) for name in request.FILES
    )
    return canonical_json({"fields": fields, "files": files})


def _file_digest(upload: UploadedFile[Any]) -> list[Any]:
    digest = hashlib.sha256()
    for chunk in upload.chunks():
        digest.update(chunk)
    upload.seek(0)  # the view reads it next
    return [upload.name, upload.size, upload.content_type, digest.hexdigest()]
