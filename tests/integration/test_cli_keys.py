"""The key commands against a real redis-server, as an operator runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import redis

from quotameter.redis_keys import RedisKeys


def _cli(config_path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quotameter", *args, "--config", str(config_path)],
        capture_output=True, text=True, timeout=60,
    )


def test_create_prints_the_key_alone_and_stores_only_a_hash(config_factory):
    config, path = config_factory()
    out = _cli(path, "keys", "create", "--customer", "acme", "--tier", "pro")
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    assert out.stdout == key + "\n" and key.startswith("qm_")

    key_id = key.split("_")[1]
    client = redis.Redis.from_url(config.services.redis_url, decode_responses=True)
    record = client.hgetall(RedisKeys(config.services.redis_prefix).api_key(key_id))
    assert record["customer"] == "acme" and record["tier"] == "pro" and record["revoked"] == "0"
    secret = key.split("_", 2)[2]
    dump = json.dumps({k: client.dump(k).hex() for k in client.keys(f"{config.services.redis_prefix}:*")})
    assert secret not in json.dumps(record) and secret.encode().hex() not in dump


def test_create_json_revoke_and_list(config_factory):
    _, path = config_factory()
    created = json.loads(_cli(path, "keys", "create", "--customer", "acme", "--tier", "free", "--json").stdout)
    assert set(created) == {"key", "key_id", "customer", "tier"}

    listed = _cli(path, "keys", "list").stdout
    assert f"{created['key_id']}\tacme\tfree\tactive" in listed
    assert created["key"] not in listed

    revoked = _cli(path, "keys", "revoke", created["key_id"])
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    assert f"{created['key_id']}\tacme\tfree\trevoked" in _cli(path, "keys", "list").stdout


def test_clear_errors(config_factory):
    _, path = config_factory()
    unknown_tier = _cli(path, "keys", "create", "--customer", "acme", "--tier", "platinum")
    assert unknown_tier.returncode == 2 and "unknown tier 'platinum'" in unknown_tier.stderr
    missing = _cli(path, "keys", "revoke", "0123456789ab")
    assert missing.returncode == 1 and "no key with id" in missing.stderr


def test_redis_down_is_a_clear_error(config_factory):
    _, path = config_factory({"services": {"redis_url": "redis://127.0.0.1:1/0"}})
    out = _cli(path, "keys", "create", "--customer", "acme", "--tier", "pro")
    assert out.returncode == 1 and "cannot reach Redis at redis://127.0.0.1:1/0" in out.stderr


def test_create_with_a_project(config_factory):
    config, path = config_factory()
    created = json.loads(_cli(path, "keys", "create", "--customer", "acme", "--tier", "pro", "--project", "search-app",
                              "--json").stdout)
    assert created["project"] == "search-app"
    client = redis.Redis.from_url(config.services.redis_url, decode_responses=True)
    record = client.hgetall(RedisKeys(config.services.redis_prefix).api_key(created["key_id"]))
    assert record["project"] == "search-app"
    bad = _cli(path, "keys", "create", "--customer", "acme", "--tier", "pro", "--project", "p" * 257)
    assert bad.returncode == 2 and "--project is longer than 256 characters" in bad.stderr
