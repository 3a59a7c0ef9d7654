"""A visitor's files stay theirs: an ASGI middleware in front of Gradio.

Gradio keeps uploads, and the pictures it writes for answers, in one upload folder; it serves any
file there to whoever asks for ``/gradio_api/file=<absolute path>`` and takes any such path as an
input. Here every client gets a random visitor cookie, and a file of the upload folder reaches a
visitor only under an alias of its own (``visitor-file/<random>/<name>``): every answer (upload
replies, event streams, JSON) has the folder's paths replaced by the visitor's aliases, and every
request body has them translated back. So

- ``file=`` serves an alias only to the visitor it was handed to, and no path of the folder;
- a request naming a file of the folder other than by one of the caller's aliases is refused;
- no answer shows a path of the server;
- a visitor's files are deleted when their last open page closes (its heartbeat stream ends), or
  after ``idle_seconds`` without a request (API clients keep no page open).

Request bodies other than file uploads (which Gradio caps per file) are capped at ``max_body``.
Everything runs on the event loop, so the registry needs no lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from starlette.requests import cookie_parser

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

COOKIE = "hat-visitor"
ALIAS = "visitor-file/"
API = "/gradio_api"
FILE_ROUTES = (f"{API}/file=", f"{API}/file/")
UPLOAD_ROUTE = f"{API}/upload"
HEARTBEAT_ROUTE = f"{API}/heartbeat/"
SWEEP_SECONDS = 60
DRAINED = 64  # a body this many times too large is not read to its end
PATH_MAX = 4096  # a longer path cannot be opened (and resolving it could take minutes)
_TOKEN = re.compile(r"[A-Za-z0-9_-]{32,64}")
_ALIAS = re.compile(rf"{ALIAS}[A-Za-z0-9_-]{{22}}/[^/]+")
STREAMS = (b"application/json", b"text/event-stream")
NOT_YOURS = "That file was not handed to you by this app; upload it again."


class Refused(Exception):
    """A request that must not reach Gradio: its status and what to tell the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Visitor:
    """One visitor's aliases (alias → file, file → alias), open pages and last request."""

    files: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    pages: int = 0
    seen: float = field(default_factory=time.monotonic)


class VisitorFiles:
    """The middleware (``Middleware(VisitorFiles, upload_dir=…, max_body=…, idle_seconds=…)``)."""

    def __init__(self, app, upload_dir: str | Path, max_body: int, idle_seconds: float):
        self.app = app
        self.folder = os.path.realpath(upload_dir) + os.sep
        self.max_body = max_body
        self.idle_seconds = idle_seconds
        self.visitors: dict[str, Visitor] = {}
        self._swept = time.monotonic()

    # ---------------------------------------------------------------- requests
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token, new = self._token(scope)
        if new:
            send = _with_cookie(send, token, _is_https(scope))
        self._sweep()
        if token in self.visitors:
            self.visitors[token].seen = time.monotonic()
        path = _route(scope)
        try:
            if path.startswith(FILE_ROUTES):
                scope = self._file_scope(scope, path, token)
            elif path != UPLOAD_ROUTE and scope["method"] in ("POST", "PUT", "PATCH"):
                receive = await self._checked_body(receive, token)
        except Refused as refusal:
            await _refuse(send, refusal)
            return
        send = self._translating(send, token)
        if not path.startswith(HEARTBEAT_ROUTE):
            await self.app(scope, receive, send)
            return
        visitor = self.visitors.setdefault(token, Visitor())
        visitor.pages += 1
        try:
            await self.app(scope, receive, send)
        finally:
            visitor.pages -= 1
            if visitor.pages == 0:
                self.forget(token)

    def _token(self, scope: Scope) -> tuple[str, bool]:
        """The visitor's cookie, or a new random one (``True``: set it on the answer). Read as
        browsers write cookies (Starlette's parser): ``http.cookies`` stops at the first cookie
        it finds malformed, such as another site script's with a space or JSON in it."""
        for name, value in scope["headers"]:
            if name == b"cookie":
                token = cookie_parser(value.decode("latin-1")).get(COOKIE, "")
                if _TOKEN.fullmatch(token):
                    return token, False
        return secrets.token_urlsafe(32), True

    def _real(self, alias: str, token: str) -> str:
        visitor = self.visitors.get(token)
        real = visitor.files.get(alias) if visitor else None
        if real is None:
            raise Refused(404, "No such file of yours.")
        return real

    def _file_scope(self, scope: Scope, path: str, token: str) -> Scope:
        """``file=`` of one of the visitor's aliases, as Gradio's route for the file behind it
        (if it is still there: Gradio's refusal would name its path)."""
        route = next(r for r in FILE_ROUTES if path.startswith(r))
        target = path[len(route) :]
        if target.startswith(ALIAS):
            real = self._real(target, token)
            if not os.path.isfile(real):
                raise Refused(404, "That file is gone; upload it again.")
            mount = scope["path"][: len(scope["path"]) - len(path)]
            served = f"{mount}{FILE_ROUTES[0]}{real}"
            return {**scope, "path": served, "raw_path": quote(served).encode()}
        if self._in_folder(target):
            raise Refused(404, "No such file of yours.")
        return scope

    async def _checked_body(self, receive: Receive, token: str) -> Receive:
        """The body, at most ``max_body`` bytes, with the visitor's aliases made paths again. A
        larger one is read to its end (up to ``DRAINED`` times ``max_body``) and dropped before
        the refusal: a client still sending when the server closes gets no answer, only a broken
        pipe."""
        chunks, size, more = [], 0, True
        while more and size <= DRAINED * self.max_body:
            message = await receive()
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size <= self.max_body:
                chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        if size > self.max_body:
            raise Refused(413, f"The request is larger than {self.max_body:,} bytes.")
        body = b"".join(chunks)
        try:
            data = json.loads(body)
        except ValueError:
            pass  # not JSON (a form): it names none of Gradio's files
        else:
            body = json.dumps(_walk(data, lambda text: self._inbound(text, token))).encode()
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return replay

    def _inbound(self, text: str, token: str) -> str:
        """A string of a request: an alias of the caller's as its path; any other naming of the
        upload folder refused."""
        if _ALIAS.fullmatch(text):
            try:
                return self._real(text, token)
            except Refused:
                raise Refused(403, NOT_YOURS) from None
        if self._in_folder(text):
            raise Refused(403, NOT_YOURS)
        return text

    def _in_folder(self, text: str) -> bool:
        """Whether ``text``, read as a path (a relative one from the working directory), names a
        file in the upload folder. It is read both ways a server reads a path: Gradio's (``..``
        taken away first, then symlinks followed) and ``open``'s (each symlink followed before
        the ``..`` after it); either reading that names an existing file counts. Only those are
        resolved (one ``lstat`` per part): every string of a request is checked."""
        if not text or "\0" in text:
            return False
        readings = {os.path.abspath(text), str(Path(text))}
        return any(
            len(path) < PATH_MAX
            and os.path.exists(path)
            and os.path.realpath(path).startswith(self.folder)
            for path in readings
        )

    # ---------------------------------------------------------------- answers
    def _translating(self, send: Send, token: str) -> Send:
        """``send`` with the upload folder's paths in JSON and event-stream answers replaced by
        the visitor's aliases (a JSON answer is sent whole, with its new length)."""
        kind, start, pending = None, {}, b""

        def translate(data: bytes) -> bytes:
            try:
                parsed = json.loads(data)
            except ValueError:
                return data  # not JSON ("ALIVE")
            return json.dumps(_walk(parsed, lambda text: self._outbound(text, token))).encode()

        async def translated(message: Message) -> None:
            nonlocal kind, start, pending
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                kind = headers.get(b"content-type", b"").split(b";")[0]
                if kind == b"application/json":
                    start = message  # sent with the body, whose length changes
                else:
                    await send(message)
                return
            if message["type"] != "http.response.body" or kind not in STREAMS:
                await send(message)
                return
            pending += message.get("body", b"")
            more = message.get("more_body", False)
            if kind == b"application/json":
                if not more:
                    body = translate(pending)
                    headers = [(k, v) for k, v in start["headers"] if k != b"content-length"]
                    headers.append((b"content-length", b"%d" % len(body)))
                    await send({**start, "headers": headers})
                    await send({"type": "http.response.body", "body": body})
                return
            events = pending.split(b"\n\n")
            pending = events.pop()  # an event not yet complete
            body = b"".join(_event(event, translate) + b"\n\n" for event in events)
            if not more:
                body, pending = body + pending, b""
            if body or not more:
                await send({"type": "http.response.body", "body": body, "more_body": more})

        return translated

    def _outbound(self, text: str, token: str) -> str:
        """A path of the upload folder (or a ``file=`` URL of one) as the visitor's alias."""
        if text.startswith(self.folder):
            return self._alias(text, token)
        head, route, tail = text.partition("/file=")
        if route and unquote(tail).startswith(self.folder):
            return f"{head}{route}{quote(self._alias(unquote(tail), token))}"
        return text

    def _alias(self, real: str, token: str) -> str:
        visitor = self.visitors.setdefault(token, Visitor())
        alias = visitor.aliases.get(real)
        if alias is None:
            alias = f"{ALIAS}{secrets.token_urlsafe(16)}/{Path(real).name}"
            visitor.aliases[real], visitor.files[alias] = alias, real
        return alias

    # ---------------------------------------------------------------- lifetime
    def forget(self, token: str) -> None:
        """Drop a visitor's aliases and delete the files no other visitor holds."""
        visitor = self.visitors.pop(token, None)
        if visitor is None:
            return
        held = {real for other in self.visitors.values() for real in other.aliases}
        for real in visitor.aliases:
            if real not in held:
                path = Path(real)
                path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):  # Gradio's folder of one content hash, if empty
                    path.parent.rmdir()

    def _sweep(self) -> None:
        """Forget visitors without an open page and idle for ``idle_seconds`` (once a minute)."""
        now = time.monotonic()
        if now - self._swept < SWEEP_SECONDS:
            return
        self._swept = now
        for token, visitor in list(self.visitors.items()):
            if visitor.pages == 0 and now - visitor.seen > self.idle_seconds:
                self.forget(token)


def _walk(data: Any, change: Callable[[str], str]) -> Any:
    """``data`` (parsed JSON) with every string value passed through ``change``."""
    if isinstance(data, str):
        return change(data)
    if isinstance(data, list):
        return [_walk(item, change) for item in data]
    if isinstance(data, dict):
        return {key: _walk(value, change) for key, value in data.items()}
    return data


def _event(event: bytes, translate: Callable[[bytes], bytes]) -> bytes:
    """One server-sent event with the JSON of its ``data:`` lines translated."""
    lines = event.split(b"\n")
    return b"\n".join(
        b"data: " + translate(line[6:]) if line.startswith(b"data: ") else line for line in lines
    )


def _route(scope: Scope) -> str:
    """The request's path below the app's mount point, if it has one."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _is_https(scope: Scope) -> bool:
    forwarded = dict(scope["headers"]).get(b"x-forwarded-proto", b"")
    return scope.get("scheme") == "https" or forwarded.split(b",")[0].strip() == b"https"


def _with_cookie(send: Send, token: str, https: bool) -> Send:
    """``send`` that sets the visitor cookie on the answer. Over https it may travel in a
    third-party frame (a Space embedded in its page), partitioned by that page."""
    where = "SameSite=None; Secure; Partitioned" if https else "SameSite=Lax"
    cookie = f"{COOKIE}={token}; Path=/; HttpOnly; {where}".encode()

    async def with_cookie(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
        await send(message)

    return with_cookie


async def _refuse(send: Send, refusal: Refused) -> None:
    body = json.dumps({"detail": str(refusal)}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
