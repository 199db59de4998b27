"""Offline token counting (quotameter.tokens), no services."""

from __future__ import annotations

import pytest

from quotameter.embedded.mock_llm import completion_pieces
from quotameter.tokens import count_messages, count_prompt, count_text, encoding_for


def test_known_models_get_their_encoding_and_unknown_ones_o200k() -> None:
    assert encoding_for("gpt-4o-mini").name == "o200k_base"
    assert encoding_for("gpt-4").name == "cl100k_base"
    assert encoding_for("gpt-4o-2024-08-06").name == "o200k_base"  # dated names resolve by family
    assert encoding_for("gpt-4-turbo").name == "cl100k_base"
    assert encoding_for("davinci").name == "o200k_base"  # legacy vocabularies are not shipped
    assert encoding_for("mock-small").name == "o200k_base"
    assert encoding_for(None).name == "o200k_base"


# Ground truth written down, not computed by the code under test: counts under
# tiktoken 0.14's own BPE over the same vocabulary files (whose SHA-256 equal
# the ones OpenAI publishes for o200k_base and cl100k_base).
KNOWN_COUNTS = [  # text, o200k_base, cl100k_base
    ("hello world", 2, 2),
    ("You are terse.", 4, 4),
    ("Name some words.", 4, 4),
    ("Say some words.", 4, 4),
    ("<|endoftext|>", 7, 7),  # a user's special-token text is just text, never an error
    ("alpha delta echo hotel the and cat dog sun red blue tree", 12, 12),
    ("Ünïcödé façade — naïve café 北京 🚀 x²", 15, 21),
    ("  leading   spaces\n\nand\ttabs", 8, 8),
    ("12345678901", 4, 4),
    ("don't I'll we've", 3, 6),
]


@pytest.mark.parametrize(("text", "o200k", "cl100k"), KNOWN_COUNTS)
def test_count_text_matches_an_independent_tokenizer(text: str, o200k: int, cl100k: int) -> None:
    assert (count_text(text, "gpt-4o-mini"), count_text(text, "gpt-4")) == (o200k, cl100k)


def test_count_text() -> None:
    assert count_text("") == 0
    assert count_text("hello world", "gpt-4o-mini") == 2


def test_chat_prompt_follows_openais_recipe() -> None:
    messages = [{"role": "user", "content": "hello world"}]
    # 3 per message + "user" (1) + "hello world" (2) + 3 to prime the reply
    assert count_messages(messages, "gpt-4o") == 3 + 1 + 2 + 3
    named = [{"role": "user", "name": "bob", "content": "hello world"}]
    assert count_messages(named, "gpt-4o") == count_messages(messages, "gpt-4o") + count_text("bob") + 1


def test_content_parts_count_their_text() -> None:
    as_parts = [{"role": "user", "content": [{"type": "text", "text": "hello world"}, {"type": "image_url"}]}]
    as_text = [{"role": "user", "content": "hello world"}]
    assert count_messages(as_parts) == count_messages(as_text)


def test_count_prompt_for_each_route_shape() -> None:
    assert count_prompt({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}) == 3 + 1 + 1 + 3
    assert count_prompt({"model": "gpt-4o", "prompt": "hello world"}) == 2
    assert count_prompt({"input": ["hello world", "hello"]}) == 3
    assert count_prompt({"input": [1, 2, 3, 4]}) == 4  # already tokens
    assert count_prompt({}) == 0


@pytest.mark.parametrize("model", ["mock-small", "gpt-4o-mini", "gpt-4"])
@pytest.mark.parametrize("n_tokens", [0, 1, 3, 16, 100, 257])
def test_mock_completion_is_exactly_n_tokens(model: str, n_tokens: int) -> None:
    pieces = completion_pieces(n_tokens)
    assert len(pieces) == n_tokens
    assert count_text("".join(pieces), model) == n_tokens
    assert all(count_text(piece, model) == 1 for piece in pieces)
