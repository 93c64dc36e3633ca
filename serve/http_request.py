"""Reading an API request: its JSON body (size-checked before and after reading) and its API key.
Every route reads its request through these two, so each rule is written once."""
from __future__ import annotations

import hmac
import json

from fastapi import Request

from serve.chat import MAX_CHAT_CHARS
from serve.protocol import ApiError

# a chat at its size limit at 8 bytes a character (UTF-8 takes at most 4, a JSON \uXXXX escape 6), and the rest
MAX_BODY_BYTES = 8 * MAX_CHAT_CHARS + 65536


async def read_json(request: Request) -> object:
    """The body, as JSON only (a text/plain POST skips a browser's CORS preflight), size-checked
    before and after reading, parsed; ApiError if it is not JSON."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, "send the body as JSON, with Content-Type: application/json", code="unsupported_media_type")
    too_large = ApiError(413, f"the request body is above {MAX_BODY_BYTES:,} bytes", code="request_too_large")
    if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
        raise too_large
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise too_large
    try:
        return json.loads(raw)
    except Exception as e:  # whatever the parser raises is the body's fault: 100,000 '[' raise RecursionError
        raise ApiError(400, f"the request body is not valid JSON ({type(e).__name__})") from None


def check_key(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
        raise ApiError(401, "a valid API key is required: Authorization: Bearer KEY", "authentication_error",
                       code="invalid_api_key")
