"""services.redis_url: the scheme picks one Redis, a Cluster or Sentinel."""

from __future__ import annotations

import pytest

from quotameter.redis_url import RedisTopology, topology


def test_schemes_and_their_parts() -> None:
    assert topology("redis://127.0.0.1:6379/0") == RedisTopology("single", False)
    assert topology("rediss://cache:6380/1").tls
    assert topology("redis+cluster://u:p%40ss@10.0.0.1:7000,10.0.0.2,[::1]:7002/") == RedisTopology(
        "cluster", False, (("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002)), "u", "p@ss")
    assert topology("rediss+sentinel://:secret@s1,s2:26380/mymaster/2") == RedisTopology(
        "sentinel", True, (("s1", 26379), ("s2", 26380)), None, "secret", "mymaster", 2)
    assert topology("redis+sentinel://s1/mymaster").db == 0


@pytest.mark.parametrize(("url", "message"), [
    ("memcached://x", "unknown Redis URL scheme"),
    ("redis+cluster://h:7000/0", "no databases"),
    ("redis+cluster:///", "names no host"),
    ("redis+sentinel://s1:26379", "/<master name>"),
    ("redis+sentinel://s1:26379/m/x", "/<master name>"),
])
def test_malformed_urls_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        topology(url)


def test_the_config_refuses_a_malformed_url() -> None:
    from pydantic import ValidationError

    from quotameter.config import Services

    assert Services(redis_url="redis+cluster://10.0.0.1:7000").redis_url.startswith("redis+cluster")
    with pytest.raises(ValidationError, match="master name"):
        Services(redis_url="redis+sentinel://10.0.0.1:26379")
