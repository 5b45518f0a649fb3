"""``POST /search`` bodies, parsed in this process (``pipelines.serve.search_body``, what the
handler runs before any model call; tests/ray_jobs/test_serve.py sends them over HTTP): a body
the service cannot use is a 400 or 413, never a 500."""

from __future__ import annotations

import base64
import json

import pytest
from fastapi import HTTPException

from pipelines.serve import search_body

JSON = "application/json"


def status(content_type: str, body: bytes) -> int:
    try:
        search_body(content_type, body, max_images=4)
    except HTTPException as e:
        return e.status_code
    return 200


@pytest.mark.parametrize("body", [
    b"[" * 100_000 + b"]" * 100_000,  # was a 500 RecursionError
    b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"a": ' * 100_000 + b"1" + b"}" * 100_000,
    b"[" * 100_000,  # nested and unfinished
])
def test_deeply_nested_json_is_a_400(body):
    with pytest.raises(HTTPException) as info:
        search_body(JSON, body, max_images=4)
    assert info.value.status_code == 400 and info.value.detail == "body is not usable JSON: nested too deeply"


@pytest.mark.parametrize("body, code", [
    (b"", 400), (b"{", 400), (b"\xff\xfe\x00binary", 400), (b"1" * 10_000, 400),  # an integer beyond int's digit limit
    (b'{"images": []}', 400), (b'{"images": "abc"}', 400), (b'{"images": [1]}', 400), (b"null", 400),
    (b'{"images": ["not base64!"]}', 400), (b'{"images": ["\\u00e9"]}', 400),
    (json.dumps({"images": ["aGk="] * 5}).encode(), 413),
])
def test_malformed_json_bodies_are_4xx(body, code):
    assert status(JSON, body) == code


def test_usable_bodies_give_their_images():
    blob = b"\x89PNG any bytes"
    assert search_body("image/png", blob, max_images=4) == ([blob], ["image"])
    body = json.dumps({"images": [base64.b64encode(blob).decode()] * 2}).encode()
    assert search_body("application/json; charset=utf-8", body, max_images=4) == ([blob, blob], ["image 0", "image 1"])
