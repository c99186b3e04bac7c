"""HTTP to an OpenAI-compatible serving engine (vLLM): model check, streamed requests, retries, clear errors.

Two endpoints carry a turn (``ServerOptions.api``)::

    chat    POST {url}/chat/completions             messages with image data URLs; the server renders the
                                                    template. For trained models (replies are plain text).
    tokens  POST {root}/inference/v1/generate       token ids (one <|image_pad|> per image, expanded by the
                                                    server) + every image as content_parts; ids come back.
                                                    Exact ids (vLLM started with --enable-scale-out).

Both stream server-sent events. Only connecting is retried (with exponential backoff): once a request was
accepted, a retry could run the turn twice. A stream that stalls longer than ``read_timeout_s`` is a
:class:`ServerTimeout`. Every failure is one of the :class:`~edge_duet.errors.ServerError` subclasses, whose
message names the server and the fix.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Iterator

from edge_duet.errors import (
    ServerModelMismatch,
    ServerRejected,
    ServerTimeout,
    ServerUnavailable,
    UsageError,
)

API_CHOICES = ("chat", "tokens")
RETRY_STATUS = (502, 503, 504)  # a proxy or a server still starting: nothing ran, safe to retry


@dataclass(frozen=True)
class ServerOptions:
    """Where and how to reach the serving engine."""

    url: str  # http://HOST:PORT/v1 (the /v1 is added when missing)
    served_model: str  # the name the server serves the model under (vLLM's --served-model-name)
    api: str = "chat"  # chat | tokens
    token: str | None = None  # bearer token (vLLM's --api-key)
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0  # longest silence inside a response
    retries: int = 3  # extra connection attempts, after waits of backoff_s, 2*backoff_s, ...
    backoff_s: float = 0.5
    image_format: str = "jpeg"  # jpeg (small) | png (lossless: what the tests use for exact parity)
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        if self.api not in API_CHOICES:
            raise UsageError(f"`ServerOptions.api` must be one of {', '.join(API_CHOICES)}, got {self.api!r}")
        if self.image_format not in ("jpeg", "png"):
            raise UsageError(f"image format must be jpeg or png, got {self.image_format!r}")
        if not self.url.startswith(("http://", "https://")):
            raise UsageError(f"`ServerOptions.url` must be an http(s) URL such as http://gpu-host:8000/v1, got {self.url!r}")
        if not self.served_model:
            raise UsageError("`ServerOptions.served_model` is empty: give the name the server serves the model under")
        if self.connect_timeout_s <= 0 or self.read_timeout_s <= 0 or self.retries < 0 or self.backoff_s < 0:
            raise UsageError("server timeouts must be positive, retries and backoff non-negative")

    @property
    def api_url(self) -> str:
        url = self.url.rstrip("/")
        return url if url.endswith("/v1") else url + "/v1"

    @property
    def root_url(self) -> str:
        return self.api_url[: -len("/v1")]


class Client:
    """One connection pool to the server (one per session: sessions run in their own threads)."""

    def __init__(self, options: ServerOptions):
        import httpx

        self.options = options
        headers = {"Authorization": f"Bearer {options.token}"} if options.token else {}
        timeout = httpx.Timeout(options.read_timeout_s, connect=options.connect_timeout_s)
        self._httpx = httpx
        self._client = httpx.Client(headers=headers, timeout=timeout)

    def close(self) -> None:
        self._client.close()

    # ------------------------------------------------------------------ model check
    def models(self) -> list[dict[str, Any]]:
        url = self.options.api_url + "/models"
        response = self._send("GET", url)
        try:
            data = response.json()["data"]
        except (ValueError, KeyError, TypeError):
            raise ServerRejected(f"{url} did not answer like an OpenAI-compatible server (no model list): "
                                 "check `ServerOptions.url`, e.g. http://gpu-host:8000/v1") from None
        return [m for m in data if isinstance(m, dict)]

    def check_model(self, min_context_tokens: int | None = None) -> dict[str, Any]:
        """The served model's entry from ``/v1/models``; raise :class:`ServerModelMismatch` when the server does
        not serve ``served_model`` or its context (vLLM's ``max_model_len``) is shorter than ours."""
        name = self.options.served_model
        models = self.models()
        entry = next((m for m in models if m.get("id") == name), None)
        if entry is None:
            served = ", ".join(repr(m.get("id")) for m in models) or "nothing"
            raise ServerModelMismatch(
                f"the server at {self.options.api_url} serves {served}, not {name!r}: set `ServerOptions.served_model` "
                "to one of those names, or point `ServerOptions.url` at the server that runs your model"
            )
        limit = entry.get("max_model_len")
        if min_context_tokens and isinstance(limit, int) and limit < min_context_tokens:
            raise ServerModelMismatch(
                f"{name!r} at {self.options.api_url} accepts {limit} tokens (max_model_len), fewer than the context "
                f"budget of {min_context_tokens}: set `max_context_tokens` {limit} or restart vLLM with "
                f"--max-model-len {min_context_tokens}"
            )
        return entry

    # ------------------------------------------------------------------ streamed requests
    def stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST ``body`` to the endpoint of ``options.api`` with streaming on; yields each event's JSON.
        Closing the generator closes the connection, which makes vLLM abort the request."""
        if self.options.api == "chat":
            url = self.options.api_url + "/chat/completions"
        else:
            url = self.options.root_url + "/inference/v1/generate"
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        response = self._send("POST", url, json=body, stream=True)
        httpx = self._httpx
        try:
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                try:
                    event = json.loads(data)
                except ValueError:
                    raise ServerRejected(f"{url} sent a malformed event: {data[:200]!r}") from None
                if isinstance(event, dict) and "error" in event:
                    raise ServerRejected(f"{url} failed during the request: {_error_text(event)}")
                yield event
        except httpx.TimeoutException:
            raise ServerTimeout(self._timeout_message(url)) from None
        except httpx.TransportError as exc:
            raise ServerUnavailable(
                f"the connection to {url} broke during a reply ({type(exc).__name__}: {exc}); the turn was not "
                "committed and is sent again with the next step. Check that the server is still running."
            ) from None
        finally:
            response.close()

    def _send(self, method: str, url: str, *, json: Any = None, stream: bool = False):
        """One request, retried on connection failures and 502/503/504 with exponential backoff."""
        httpx = self._httpx
        o = self.options
        last = ""
        for attempt in range(o.retries + 1):
            if attempt:
                time.sleep(o.backoff_s * 2 ** (attempt - 1))
            try:
                request = self._client.build_request(method, url, json=json)
                response = self._client.send(request, stream=stream)
            except httpx.TimeoutException as exc:
                if isinstance(exc, httpx.ConnectTimeout):
                    last = f"connect timed out after {o.connect_timeout_s:g} s"
                    continue
                raise ServerTimeout(self._timeout_message(url)) from None
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code in RETRY_STATUS:
                last = f"HTTP {response.status_code}"
                response.close()
                continue
            if response.status_code >= 400:
                raise self._rejected(url, response)
            return response
        raise ServerUnavailable(
            f"cannot reach the server at {url} ({last}; {o.retries + 1} attempts): check that vLLM is running "
            "and that `ServerOptions.url` names its address (http://HOST:PORT/v1)"
        )

    def _rejected(self, url: str, response) -> ServerRejected:
        status = response.status_code
        try:
            response.read()
            detail = _error_text(response.json())
        except Exception:  # noqa: BLE001 - an unreadable or non-JSON body: the status says enough
            detail = ""
        finally:
            response.close()
        if status == 401:
            hint = "the server wants a bearer token: set `ServerOptions.token` (or EDGE_DUET_SERVER_TOKEN)"
        elif status in (403, 404) and url.endswith("/inference/v1/generate"):
            hint = "the token endpoint is off: start vLLM with --enable-scale-out, or set `ServerOptions.api` chat"
        elif status == 404:
            hint = "no such endpoint or model: check `ServerOptions.url` and `ServerOptions.served_model`"
        else:
            hint = "see the server's log"
        return ServerRejected(f"{url} answered HTTP {status}: {detail or 'no detail'} ({hint})", status)

    def _timeout_message(self, url: str) -> str:
        return (f"{url} sent nothing for {self.options.read_timeout_s:g} s: the server is overloaded or the model "
                "too slow for it; raise `ServerOptions.read_timeout_s` or serve fewer streams")


def _error_text(data: Any) -> str:
    err = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(err, dict):
        return str(err.get("message") or err.get("detail") or err)
    if isinstance(data, dict) and "detail" in data:
        return str(data["detail"])
    return str(err)[:300]
