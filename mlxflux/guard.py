"""Who may use the studio (`mlxflux serve`): an ASGI middleware in front of every route.

A local web server is reachable from any page the browser shows:

- DNS rebinding: a name the attacker controls, re-pointed at 127.0.0.1, makes the studio the
  same origin as the attacker's page, which may then read it. Refused by the `Host` header:
  only names that mean this machine are served (the loopback names, the `--host` value, names
  given with `--allow-host`; with a wildcard `--host` also this machine's own names and any IP
  address, which no one can re-point).
- Cross-site requests (CSRF): a page elsewhere can send a form POST without asking. Refused by
  the `Origin` header on requests that change state (POST, DELETE, PUT, PATCH): it must be the
  studio's own origin (scheme, host and port). `Origin: null` (a sandboxed page, a file) is
  refused; no `Origin` at all (curl, scripts) is accepted.
- Off loopback, anyone on the network: a token is required (`--token`, or generated and
  printed once with the URL). The page opened with `?token=...` keeps it in an HttpOnly,
  SameSite=Strict cookie; scripts send `Authorization: Bearer <token>`.

Nothing here is an account: whoever holds the token is in (README, "Security").
"""

import hmac
import ipaddress
import json
import socket
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, urlsplit

LOOPBACK = ("localhost", "127.0.0.1", "::1")
WILDCARD = ("0.0.0.0", "::", "")
COOKIE = "mlxflux_token"
CHANGES = ("POST", "PUT", "PATCH", "DELETE")


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def split_host(value: str) -> tuple[str, int | None]:
    """("name", port) of a Host header or an origin's netloc, the name lower-case, without
    brackets or a trailing dot; ("", None) when it does not parse."""
    try:
        parts = urlsplit(f"//{value.strip()}")
        name, port = (parts.hostname or "").rstrip("."), parts.port
    except ValueError:
        return "", None
    return name.lower(), port


class Guard:
    """The middleware: `hosts` the names served besides the loopback ones, `bind` the address
    listened on, `token` None or the token every request must carry."""

    def __init__(self, app, bind: str = "127.0.0.1", hosts=(), token: str | None = None):
        self.app, self.token = app, token
        self.wildcard = bind.strip("[]") in WILDCARD
        names = {*LOOPBACK, bind.strip("[]").lower(), *(h.lower().rstrip(".") for h in hosts)}
        if self.wildcard:
            names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        self.names = names - set(WILDCARD)

    def host_allowed(self, host: str) -> bool:
        name, _ = split_host(host)
        return bool(name) and (name in self.names or (self.wildcard and _ip(name)))

    def origin_allowed(self, origin: str, host: str, scheme: str) -> bool:
        """The request's own origin: the same scheme, name and port as its Host header."""
        if origin.strip().lower() == "null":
            return False
        parts = urlsplit(origin.strip())
        default = {"http": 80, "https": 443}
        try:
            port = parts.port or default.get(parts.scheme)
        except ValueError:
            return False
        name, host_port = split_host(host)
        return (
            parts.scheme == scheme
            and (parts.hostname or "").lower().rstrip(".") == name
            and port == (host_port or default.get(scheme))
        )

    def token_given(self, headers: dict, query: dict) -> tuple[bool, bool]:
        """(whether the request carries the token, whether it came in the query string)."""
        offered = []
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            offered.append(auth[7:].strip())
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # noqa: BLE001 - a malformed cookie header carries no token
            cookie = SimpleCookie()
        if COOKIE in cookie:
            offered.append(cookie[COOKIE].value)
        in_query = query.get("token", [])
        offered += in_query
        ok = any(hmac.compare_digest(t.encode(), self.token.encode()) for t in offered)
        return ok, ok and any(hmac.compare_digest(t.encode(), self.token.encode())
                              for t in in_query)  # fmt: skip

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if not self.host_allowed(host):
            return await _refuse(send, 403, f"{split_host(host)[0] or 'this'} is not a name "
                                 "of this studio (start it with --allow-host NAME)")  # fmt: skip
        origin, scheme = headers.get("origin"), scope.get("scheme", "http")
        changes = scope["method"].upper() in CHANGES
        if changes and origin is not None and not self.origin_allowed(origin, host, scheme):
            return await _refuse(send, 403, "a request from another site: refused")
        set_cookie = False
        if self.token is not None:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            ok, set_cookie = self.token_given(headers, query)
            if not ok:
                return await _refuse(send, 401, "this studio needs its token: open the URL "
                                     "`mlxflux serve` printed (…/?token=…)")  # fmt: skip
        if not set_cookie:
            return await self.app(scope, receive, send)

        async def with_cookie(message):  # the page opened with ?token= keeps it
            if message["type"] == "http.response.start":
                value = f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/"
                message["headers"] = [*message.get("headers", []),
                                      (b"set-cookie", value.encode("latin-1"))]  # fmt: skip
            await send(message)

        return await self.app(scope, receive, with_cookie)


async def _refuse(send, status: int, message: str) -> None:
    body = json.dumps({"error": message, "field": None}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})
