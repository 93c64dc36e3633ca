"""Who may talk to the server: the API key rule, and from a browser the Host and Origin checks and
CORS, as Ollama does them. "Loopback" is is_loopback's everywhere here.

    api_access(host, api_key)   -> (serve the API?, the start-up line): without a key only on loopback
    app = Access(app, bound="127.0.0.1", allowed_hosts=[], cors_origins=[])   # ASGI middleware

- Host (every route, the page's too): a server bound to a loopback address answers only requests
  whose Host is a loopback name (localhost, *.localhost, 127.0.0.0/8, ::1) or one of
  `allowed_hosts` ("*" for any). Otherwise DNS rebinding lets a remote page read the loopback API's
  replies: its own name, resolved to 127.0.0.1, makes the server same-origin to it. A server bound
  to another address is reached by any name anyway (and its API needs a key): no Host check.
- Origin (every route, the page's Gradio routes too: a foreign page must not make the server
  generate through them either): a request a browser sends with an Origin is refused (403) unless
  the origin is a loopback one, in `cors_origins` ("*" for any) or the server's own (same Host).
  On the API's routes (serve/api.py API_PREFIXES, made from its ROUTES) allowed origins get the
  CORS headers on the preflight and on the actual responses, so a browser client the user allows
  can read them; Gradio answers CORS on its own routes. Requests without an Origin (curl, SDKs) pass.
The API takes JSON bodies only (serve/http_request.py read_json: 415), so a page cannot skip the preflight
with a text/plain POST.
"""
from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.websockets import WebSocketClose

from serve.api import API_KEY_ENV, API_PREFIXES
from serve.protocol import ApiError

EXPOSED = "X-Cogni-Notice"  # the API's own header, which a browser hides from scripts unless exposed


def is_loopback(host: str) -> bool:
    """A name or address (without port) that only this machine answers to."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):  # RFC 6761: always the loopback
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def api_access(host: str, api_key: str | None) -> tuple[bool, str]:
    """(serve the API?, the start-up log line). Open without a key only on a loopback address."""
    if api_key:
        return True, "OpenAI-compatible API on /v1 (an API key is required: Authorization: Bearer KEY)"
    if is_loopback(host):
        return True, "OpenAI-compatible API on /v1 (local only, no key)"
    return False, (f"OpenAI-compatible API is off: bound to {host} without an API key. Turn it on with "
                   f"--api-key KEY or the {API_KEY_ENV} environment variable")


def host_name(authority: str) -> str:
    """'example.com:7860' -> 'example.com', '[::1]:7860' -> '::1'."""
    try:
        return urlsplit("//" + authority).hostname or ""
    except ValueError:  # a malformed port or bracket: no name this server answers to
        return ""


class Access:
    """ASGI middleware: the Host and Origin checks for everything, CORS for the API's routes.

    Not Starlette's TrustedHostMiddleware and CORSMiddleware, which state other rules: the first
    takes name patterns only (no 127.0.0.0/8 or ::1 by address, no "check only when bound to
    loopback") and answers a plain-text 400; the second covers every path, not only the API's,
    lets a request from a refused origin through (it only leaves out the headers, so the server
    still generates for any page) and has no "the server's own origin" rule."""

    def __init__(self, app, bound: str, allowed_hosts=(), cors_origins=()):
        self.app, self.check_host = app, is_loopback(bound) and "*" not in allowed_hosts
        self.allowed_hosts = {h.lower() for h in allowed_hosts}
        self.cors_origins = {o.rstrip("/").lower() for o in cors_origins}

    def host_ok(self, authority: str) -> bool:
        name = host_name(authority)
        return not self.check_host or is_loopback(name) or name in self.allowed_hosts

    def origin_ok(self, origin: str, authority: str) -> bool:
        origin = origin.rstrip("/").lower()
        if "*" in self.cors_origins or origin in self.cors_origins:
            return True
        try:
            parts = urlsplit(origin)
        except ValueError:  # a bracket left open or around a name ("http://[::1"): no origin this server knows
            return False
        return parts.scheme in ("http", "https") and (is_loopback(parts.hostname or "") or
                                                      parts.netloc == authority.lower())

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        authority = headers.get("host", "")
        if not self.host_ok(authority):
            if scope["type"] == "websocket":
                return await WebSocketClose(code=1008)(scope, receive, send)
            return await ApiError(403, f"this server does not answer to the host {host_name(authority)!r}; "
                                       "start it with --allowed-hosts NAME to allow it", "permission_error",
                                  code="host_not_allowed").response()(scope, receive, send)
        origin = headers.get("origin")
        if origin is not None and not self.origin_ok(origin, authority):
            if scope["type"] == "websocket":
                return await WebSocketClose(code=1008)(scope, receive, send)
            return await ApiError(403, f"the origin {origin!r} may not use this server; start it with "
                                       f"--cors-origins {origin} to allow it", "permission_error",
                                  code="origin_not_allowed").response()(scope, receive, send)
        if scope["type"] != "http" or origin is None or not scope["path"].startswith(API_PREFIXES):
            return await self.app(scope, receive, send)
        cors = {"Access-Control-Allow-Origin": origin, "Vary": "Origin", "Access-Control-Expose-Headers": EXPOSED}
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:  # the preflight
            cors |= {"Access-Control-Allow-Methods": "GET, POST, OPTIONS", "Access-Control-Max-Age": "600",
                     "Access-Control-Allow-Headers": headers.get("access-control-request-headers", "")}
            return await Response(status_code=204, headers=cors)(scope, receive, send)

        async def send_with_cors(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) +
                           [(k.lower().encode(), v.encode()) for k, v in cors.items()]}
            await send(message)

        await self.app(scope, receive, send_with_cors)
