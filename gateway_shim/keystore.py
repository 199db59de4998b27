"""API key records in Redis (layout in ``quotameter.redis_keys``).

The CLI creates and revokes keys with the synchronous client; the shim looks
them up with the asyncio client. Only the salted hash is ever stored.

The key's hash and its customer's keys live in different Redis Cluster slots,
so no transaction spans them there: the revoked flag's mirror in the
customer's slot (what admission reads) is written first on revoke, so a
revocation holds at once even if the second write is lost.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis

from quotameter.config import KeyOverrides
from quotameter.errors import KeyFormatError
from quotameter.labels import id_problem
from quotameter.keys import NewKey, generate_key, split_key, verify_secret

PRIORITIES = ("interactive", "batch")
from quotameter.redis_keys import RedisKeys
from quotameter.redis_pool import is_cluster


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_id: str
    customer: str
    tier: str
    revoked: bool
    priority: str = "interactive"  # "batch": may wait in the tier's queue instead of a 429
    limits: KeyOverrides | None = None  # this key's own limits, on top of its customer's
    project: str | None = None  # spend through this key is this project's, whatever a header says

    @property
    def batch(self) -> bool:
        return self.priority == "batch"


def create_key(
    client: redis.Redis,
    names: RedisKeys,
    customer: str,
    tier: str,
    *,
    priority: str = "interactive",
    limits: KeyOverrides | None = None,
    project: str | None = None,
) -> NewKey:
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}")
    if project is not None and (problem := id_problem(project)):
        raise ValueError(f"project {problem}")
    new = generate_key()
    now_ms = int(time.time() * 1000)
    extra = {"priority": priority}
    if limits is not None:
        extra["limits"] = limits.model_dump_json(exclude_none=True)
    if project is not None:
        extra["project"] = project
    # A cluster pipeline splits the writes per slot; one Redis keeps them one transaction.
    with client.pipeline(transaction=not is_cluster(client)) as pipe:
        pipe.hset(names.revoked(customer), new.key_id, 0)
        pipe.hset(
            names.api_key(new.key_id),
            mapping={
                "customer": customer,
                "tier": tier,
                "salt": new.salt_hex,
                "hash": new.hash_hex,
                "created_ms": now_ms,
                "revoked": 0,
                **extra,
            },
        )
        pipe.hset(names.customer(customer), mapping={"tier": tier})
        pipe.execute()
    return new


def revoke_key(client: redis.Redis, names: RedisKeys, key_id: str) -> bool:
    """Mark a key revoked. False when no such key exists."""
    name = names.api_key(key_id)
    customer = client.hget(name, "customer")
    if customer is None:
        return False
    client.hset(names.revoked(customer.decode() if isinstance(customer, bytes) else customer), key_id, 1)
    client.hset(name, mapping={"revoked": 1, "revoked_ms": int(time.time() * 1000)})
    return True


def list_keys(client: redis.Redis, names: RedisKeys) -> list[KeyRecord]:
    records = []
    for name in client.scan_iter(match=names.api_key("*"), count=500):
        fields = client.hgetall(name)
        key_id = (name.decode() if isinstance(name, bytes) else name).rsplit(":", 1)[-1]
        records.append(_record(key_id, fields))
    return sorted(records, key=lambda r: (r.customer, r.key_id))


def _record(key_id: str, fields: dict) -> KeyRecord:
    get = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v) for k, v in fields.items()}
    limits = KeyOverrides.model_validate(json.loads(get["limits"])) if get.get("limits") else None
    return KeyRecord(
        key_id,
        get.get("customer", ""),
        get.get("tier", ""),
        get.get("revoked", "0") == "1",
        get.get("priority", "interactive"),
        limits,
        get.get("project") or None,
    )


async def authenticate(client: aioredis.Redis, names: RedisKeys, presented: str) -> KeyRecord | None:
    """The key's record when the presented key is valid and not revoked, else None."""
    try:
        key_id, secret = split_key(presented)
    except KeyFormatError:
        return None
    fields = await client.hgetall(names.api_key(key_id))
    if not fields:
        return None
    record = _record(key_id, fields)
    salt = fields.get(b"salt", fields.get("salt"))
    digest = fields.get(b"hash", fields.get("hash"))
    if isinstance(salt, bytes):
        salt, digest = salt.decode(), digest.decode()
    if record.revoked or not verify_secret(secret, salt, digest):
        return None
    return record
