"""quotameter inside LiteLLM's proxy: a custom auth function and a callback,
thin adapters over the request lifecycle (lifecycle.py), with the standalone
proxy's keys, limits, refusals and events. Checked against LiteLLM 1.110.2.

In LiteLLM's config (deploy/litellm/config.yaml):

    general_settings:
      master_key: os.environ/LITELLM_MASTER_KEY   # LiteLLM will not start without one
      custom_auth: gateway_shim.litellm_hook.authenticate
    litellm_settings:
      callbacks: gateway_shim.litellm_hook.quotameter

and quotameter's own YAML in ``QUOTAMETER_CONFIG``. Clients present their
quotameter key as their API key: ``authenticate`` checks it against Redis as
the shim does (LiteLLM's virtual keys need its database; a second header
would be copied into LiteLLM's logs). The hooks then run, per request:

    async_pre_call_hook          admit (reserve); a refusal is raised as LiteLLM's
                                 HTTP error with quotameter's status, message and
                                 rate-limit headers; a degraded admission rewrites
                                 the model / max_tokens; usage is asked of a stream
    async_post_call_success_hook a JSON answer: its usage, settle, emit (before
                                 LiteLLM sends it)
    async_post_call_streaming_iterator_hook
                                 each chunk tallied; cut at the budget (a last chunk
                                 with finish_reason "length", then quotameter's
                                 error event); settle, emit before the stream ends
    async_post_call_failure_hook the upstream failed: the event records it
    async_post_call_response_headers_hook
                                 the rate-limit headers on every answer

The model names quotameter sees (allowed models, prices, a tier's fallback)
are LiteLLM's ``model_name``s: a fallback must be one of them. The event's
served model is the upstream's, as the hooks see the answer (LiteLLM's answer
to the client names the model asked for, even when a fallback served it).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator
from typing import Any

from gateway_shim.errors import Answer, ShimError, UpstreamFailed, error_answer
from gateway_shim.in_process import InProcess
from gateway_shim.lifecycle import Exchange, Forward

try:  # importable without LiteLLM (its tests, the docs); inside LiteLLM the hooks need its base class
    from litellm.integrations.custom_logger import CustomLogger
except ImportError:  # pragma: no cover
    CustomLogger = object  # type: ignore[misc,assignment]

log = logging.getLogger("gateway_shim.litellm_hook")

# LiteLLM's call types, as the OpenAI route each one serves (the path after /v1).
ROUTES = {
    "acompletion": "/chat/completions", "completion": "/chat/completions",
    "atext_completion": "/completions", "text_completion": "/completions",
    "aembedding": "/embeddings", "embedding": "/embeddings",
    "aresponses": "/responses", "responses": "/responses",
}
HEADERS_KEY = "quotameter_headers"  # the rate-limit headers, kept in the request's metadata
_MAX_KEYS = 10_000


class QuotameterCallback(CustomLogger):
    def __init__(self, shim: InProcess | None = None) -> None:
        super().__init__()
        self.shim = shim or InProcess()
        # LiteLLM hands the hooks a hash of the client's key, never the key: what authenticate
        # saw, by that hash, for the lifecycle to authenticate again (from its cache). Memory only.
        self._keys: dict[str, str] = {}
        self._open: dict[str, tuple[Exchange, Forward]] = {}  # by LiteLLM's call id, until its answer

    # -- auth ---------------------------------------------------------------

    async def authenticate(self, request: Any, api_key: str) -> Any:
        """LiteLLM's ``custom_auth``: the client's quotameter key, or quotameter's 401 / 429 / 503."""
        from litellm.proxy._types import UserAPIKeyAuth

        life = await self.shim.lifecycle()
        authorization = f"Bearer {api_key}"
        try:
            refusing = life.emitter.refusing  # a request that could not be billed is not served
            if refusing is not None:
                raise refusing
            # Authenticates as the shim does (Redis away: its 503); admits nothing, emits nothing.
            key = (await life.open("POST", "/chat/completions", authorization, None, _client(request))).key
        except ShimError as exc:
            raise _http_error(error_answer(exc)) from None
        user = UserAPIKeyAuth(api_key=api_key, user_id=key.customer, key_alias=key.key_id,
                              metadata={"quotameter_tier": key.tier})
        if len(self._keys) >= _MAX_KEYS:
            self._keys.clear()
        self._keys[user.token] = authorization  # the hash LiteLLM put in place of the key
        return user

    # -- request ------------------------------------------------------------

    async def async_pre_call_hook(self, user_api_key_dict: Any, cache: Any, data: dict, call_type: str) -> dict:
        life = await self.shim.lifecycle()
        call_id = data.get("litellm_call_id")
        authorization = self._keys.get(user_api_key_dict.token or "")
        path = ROUTES.get(str(call_type), f"/{call_type}")
        try:
            exchange = await life.open("POST", path, authorization, None)
        except ShimError as exc:
            raise _http_error(error_answer(exc)) from None
        try:
            forward = await exchange.admit(json.dumps(_client_body(data), default=str).encode(), _client_headers(data))
        except Exception as exc:
            answer = exchange.refuse(exc)
            await exchange.finish()
            raise _http_error(answer) from None
        if forward.rewritten:  # a fallback model, an output cap, the usage chunk asked for
            rewritten = json.loads(forward.body)
            for field in ("model", "max_tokens", "stream_options"):
                if field in rewritten:
                    data[field] = rewritten[field]
        metadata = _metadata(data)
        if metadata is not None:
            metadata[HEADERS_KEY] = dict(exchange.headers)
        if call_id is None:  # no way to find it again: bill what was reserved, now
            log.warning("a LiteLLM request without litellm_call_id: settled on admission")
            await exchange.finish()
        else:
            self._open[call_id] = (exchange, forward)
        return data

    async def async_post_call_response_headers_hook(self, data: dict, user_api_key_dict: Any, response: Any,
                                                    request_headers: Any = None, litellm_call_info: Any = None):
        metadata = _metadata(data)
        return dict(metadata.get(HEADERS_KEY) or {}) if metadata else None

    # -- answers ------------------------------------------------------------

    async def async_post_call_success_hook(self, data: dict, user_api_key_dict: Any, response: Any) -> Any:
        opened = self._open.pop(data.get("litellm_call_id"), None)
        if opened is None:
            return response
        exchange, _ = opened
        try:
            exchange.body(200, _json(response))
        except ShimError as exc:
            answer = exchange.refuse(exc)
            raise _http_error(answer) from None
        finally:
            await exchange.finish()  # billed before LiteLLM sends the answer
        return response

    async def async_post_call_failure_hook(self, request_data: dict, original_exception: Exception,
                                           user_api_key_dict: Any, traceback_str: str | None = None) -> None:
        opened = self._open.pop(request_data.get("litellm_call_id"), None)
        if opened is None:  # refused by quotameter (already recorded), or never admitted
            return
        exchange, _ = opened
        status = getattr(original_exception, "status_code", None)
        if isinstance(status, int) and status >= 400:
            exchange.body(status, b"")  # the upstream's own error, passed on by LiteLLM
        else:
            exchange.refuse(UpstreamFailed(f"The model server failed: {original_exception}"[:1000]))
        await exchange.finish()

    async def async_post_call_streaming_iterator_hook(
        self, user_api_key_dict: Any, response: Any, request_data: dict
    ) -> AsyncGenerator[Any, None]:
        opened = self._open.pop(request_data.get("litellm_call_id"), None)
        if opened is None:
            async for chunk in response:
                yield chunk
            return
        exchange, forward = opened
        observer = exchange.stream(forward, 200)
        cut: dict[str, Any] | None = None
        try:
            async for chunk in response:
                raw = _json(chunk)
                for out in _documents(observer.feed(b"data: " + raw + b"\n\n")):
                    yield _same_or_rebuilt(chunk, raw, out)
                if observer.cut:
                    break
            else:
                observer.feed(b"data: [DONE]\n\n")
            closing = _documents(observer.end())
        except (asyncio.CancelledError, GeneratorExit):  # the client went away
            observer.client_gone()
            observer.end()
            await asyncio.shield(exchange.finish())
            raise
        except Exception:
            observer.upstream_cut()
            observer.end()
            await exchange.finish()
            raise
        await exchange.finish()  # billed before the stream's last chunk
        for out in closing:
            if "error" in out:
                cut = out["error"]
            else:
                yield type(chunk)(**out)
        if cut is not None:  # LiteLLM writes it as an error event, as the proxy's cut ends
            raise _http_error(Answer(429, {}, json.dumps({"error": cut}).encode()))


def _client(request: Any) -> str | None:
    client = getattr(request, "client", None)
    return client.host if client else None


def _client_body(data: dict) -> dict:
    """The client's request as LiteLLM received it (its own bookkeeping left out)."""
    body = (data.get("proxy_server_request") or {}).get("body")
    if isinstance(body, dict) and body:
        body = dict(body)
    else:
        body = {k: v for k, v in data.items() if k not in _LITELLM_FIELDS}
    for field in ("model", "max_tokens", "max_completion_tokens", "stream", "stream_options"):
        if field in data:
            body[field] = data[field]  # as LiteLLM will send it
    return body


def _client_headers(data: dict) -> dict[str, str]:
    """The client's request headers as LiteLLM kept them: the attribution headers."""
    headers = (data.get("proxy_server_request") or {}).get("headers")
    return {str(k): str(v) for k, v in headers.items()} if isinstance(headers, dict) else {}


_LITELLM_FIELDS = frozenset({"metadata", "litellm_metadata", "proxy_server_request", "litellm_call_id",
                             "litellm_logging_obj", "secret_fields", "user_api_key_dict"})


def _metadata(data: dict) -> dict | None:
    for name in ("metadata", "litellm_metadata"):
        if isinstance(data.get(name), dict):
            return data[name]
    return None


def _json(obj: Any) -> bytes:
    if hasattr(obj, "model_dump_json"):
        return obj.model_dump_json().encode()
    return json.dumps(obj, default=str).encode()


def _documents(events: bytes) -> list[dict[str, Any]]:
    """The JSON objects of SSE ``data:`` events ([DONE] left out: LiteLLM writes its own)."""
    found = []
    for event in events.split(b"\n\n"):
        for line in event.splitlines():
            if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
                found.append(json.loads(line[5:]))
    return found


def _same_or_rebuilt(chunk: Any, raw: bytes, out: dict[str, Any]) -> Any:
    """The chunk as LiteLLM made it when quotameter passed it on whole (null usage aside),
    else one built from what quotameter passed on (a trimmed last chunk, usage hidden)."""
    sent = json.loads(raw)
    if out == sent or out == {k: v for k, v in sent.items() if not (k == "usage" and v is None)}:
        return chunk
    return type(chunk)(**out)


def _http_error(answer: Answer) -> Exception:
    """quotameter's answer as the exception LiteLLM turns into that HTTP answer."""
    from fastapi import HTTPException

    headers = {k: v for k, v in answer.headers.items() if k.lower() != "content-type"}
    error = json.loads(answer.body).get("error") or {}
    return HTTPException(status_code=answer.status, detail=error.get("message") or "quotameter refused the request",
                         headers=headers)


quotameter = QuotameterCallback()
authenticate = quotameter.authenticate
