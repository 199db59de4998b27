"""The LiteLLM adapter's pieces that need no LiteLLM: it imports without LiteLLM
(run in a child process where ``litellm`` cannot be imported, which also keeps
LiteLLM's import-time fetches out of the unit tests), reads the client's body
apart from LiteLLM's bookkeeping, and passes a chunk on as LiteLLM made it
unless quotameter changed it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHECKS = textwrap.dedent('''
    import json, sys
    sys.modules["litellm"] = None  # "import litellm…" raises ImportError
    from gateway_shim import litellm_hook as h

    assert h.CustomLogger is object and isinstance(h.quotameter, h.QuotameterCallback)
    data = {"model": "mock-small", "max_tokens": 3, "metadata": {"headers": {}}, "litellm_call_id": "c1",
            "proxy_server_request": {"body": {"model": "alias", "messages": [{"role": "user", "content": "hi"}],
                                               "user": "u"}}}
    body = h._client_body(data)
    assert body == {"model": "mock-small", "messages": [{"role": "user", "content": "hi"}], "user": "u",
                    "max_tokens": 3}, body
    assert h._client_body({"model": "m", "messages": [], "litellm_call_id": "c", "metadata": {}}) == \\
        {"model": "m", "messages": []}

    events = b'data: {"a": 1}\\n\\ndata: {"error": {"message": "cut"}}\\n\\ndata: [DONE]\\n\\n'
    assert h._documents(events) == [{"a": 1}, {"error": {"message": "cut"}}]

    class Chunk(dict):  # stands for LiteLLM's ModelResponseStream: built from keyword fields
        def __init__(self, **fields):
            super().__init__(fields)
    chunk = Chunk(id="x", choices=[{"delta": {"content": "alpha delta"}}], usage=None)
    raw = json.dumps(chunk).encode()
    assert h._same_or_rebuilt(chunk, raw, {"id": "x", "choices": [{"delta": {"content": "alpha delta"}}]}) is chunk
    trimmed = h._same_or_rebuilt(chunk, raw, {"id": "x", "choices": [{"delta": {"content": "alpha"}}]})
    assert trimmed is not chunk and trimmed["choices"][0]["delta"]["content"] == "alpha"
    print("ok")
''')


def test_the_adapter_without_litellm() -> None:
    done = subprocess.run([sys.executable, "-c", CHECKS], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
