"""The Redis idempotency store, for gateways sharing one device's traffic.

Same contract as :class:`tools.cloud.store.SqliteStore` (see
:mod:`tools.cloud.store`). Keys, all with a TTL::

    gr:seen:{device hex}:{message id hex}   "1"   idempotency_ttl_s
    gr:asm:{device hex}:{request id}        hash  assembly_ttl_s, renewed per part
        r      REQUEST message id || body
        t      present: the REQUEST is complete by itself
        c:{i}  chunk i's media bytes
        l      index of the FINAL chunk
        n      number of chunks stored
        b      media bytes stored
        k      media kind of the chunks ("1" audio, "2" photo)
    gr:dack:{device hex}:{message id hex}   "1"   downlink_ttl_s (answer ACKed)

A message without a part is admitted with ``SET key 1 NX EX ttl``; a request
part with one Lua script that does the set-if-absent, stores the part, and,
if the request is now complete, returns every part and deletes the hash, all
in one atomic step. A batch is one pipelined round trip.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from typing import Final

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tools.cloud.store import (
    Admission,
    Assembled,
    Entry,
    Outcome,
    PartKind,
    StoreLimits,
    StoreUnavailableError,
)

__all__ = ["RedisStore"]

logger = logging.getLogger(__name__)

_NAMESPACE: Final = "gr"
_MESSAGE_ID_SIZE: Final = 16

# KEYS[1] seen key, KEYS[2] assembly hash.
# ARGV[1] seen TTL, ARGV[2] assembly TTL, ARGV[3] field ("r" or "c:<i>"),
# ARGV[4] data, ARGV[5] "1" if final (chunk) or complete alone (REQUEST),
# ARGV[6] chunk index, ARGV[7] media kind, ARGV[8] max media bytes.
# Returns {0} duplicate, {1} new, {3} refused, {2, HGETALL} new and complete.
_PART_SCRIPT: Final = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return {0} end
local asm = KEYS[2]
if ARGV[3] == 'r' then
  redis.call('HSETNX', asm, 'r', ARGV[4])
  if ARGV[5] == '1' then redis.call('HSET', asm, 't', '1') end
else
  local kind = redis.call('HGET', asm, 'k')
  if kind and kind ~= ARGV[7] then return {3} end
  local size = tonumber(redis.call('HGET', asm, 'b') or '0') + string.len(ARGV[4])
  if size > tonumber(ARGV[8]) then return {3} end
  if redis.call('HSETNX', asm, ARGV[3], ARGV[4]) == 1 then
    redis.call('HSET', asm, 'b', size, 'k', ARGV[7])
    redis.call('HINCRBY', asm, 'n', 1)
  end
  if ARGV[5] == '1' then redis.call('HSET', asm, 'l', ARGV[6]) end
end
redis.call('EXPIRE', asm, ARGV[2])
if redis.call('HEXISTS', asm, 'r') == 0 then return {1} end
if redis.call('HEXISTS', asm, 't') == 0 then
  local last = redis.call('HGET', asm, 'l')
  if not last then return {1} end
  last = tonumber(last)
  if tonumber(redis.call('HGET', asm, 'n') or '0') < last + 1 then return {1} end
  for i = 0, last do
    if redis.call('HEXISTS', asm, 'c:' .. i) == 0 then return {1} end
  end
end
local all = redis.call('HGETALL', asm)
redis.call('DEL', asm)
return {2, all}
"""


def _seconds(value: float) -> int:
    return max(1, math.ceil(value))


class RedisStore:
    """The Redis idempotency store (module docstring).

    Args:
        url: ``redis://HOST[:PORT][/DB]`` (or ``rediss://``).
        limits: Retention and size limits.
        timeout_s: Bound on connecting and on each round trip.
    """

    def __init__(self, url: str, limits: StoreLimits, *, timeout_s: float) -> None:
        """Prepare the client; :meth:`open` checks the server."""
        self._url = url
        self._limits = limits
        self._timeout_s = timeout_s
        self._client: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            decode_responses=False,
        )
        self._seen_ttl = _seconds(limits.idempotency_ttl_s)
        self._asm_ttl = _seconds(limits.assembly_ttl_s)
        self._dack_ttl = _seconds(limits.downlink_ttl_s)

    @property
    def description(self) -> str:
        """``redis URL`` (URLs carry no credentials)."""
        return f"redis {self._url}"

    async def open(self) -> None:
        """Check that the server answers; log a warning if not (it may come up)."""
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.ping()
                await self._execute(pipe)
        except StoreUnavailableError as exc:
            logger.warning(
                "%s; batches wait for it",
                exc,
            )

    async def aclose(self) -> None:
        """Close the connection pool; idempotent."""
        await self._client.aclose()

    async def admit(self, entries: Sequence[Entry]) -> list[Admission]:
        """See :meth:`tools.cloud.store.IdempotencyStore.admit`."""
        if not entries:
            return []
        async with self._client.pipeline(transaction=False) as pipe:
            return await self._admit(pipe, entries)

    async def _admit(
        self, pipe: aioredis.client.Pipeline, entries: Sequence[Entry]
    ) -> list[Admission]:
        for entry in entries:
            seen = _key("seen", entry.device_id, entry.message_id.hex())
            part = entry.part
            if part is None:
                pipe.set(seen, b"1", nx=True, ex=self._seen_ttl)
                continue
            is_request = part.kind is PartKind.REQUEST
            pipe.eval(
                _PART_SCRIPT,
                2,
                seen,
                _key("asm", entry.device_id, str(part.request_id)),
                self._seen_ttl,
                self._asm_ttl,
                "r" if is_request else f"c:{part.index}",
                part.data,
                "1" if part.final else "0",
                part.index,
                int(part.kind),
                self._limits.max_request_bytes,
            )
        replies = await self._execute(pipe)
        return [
            _verdict(entry, reply)
            for entry, reply in zip(entries, replies, strict=True)
        ]

    async def mark_downlink_acked(self, device_id: bytes, ids: Sequence[bytes]) -> None:
        """Remember the phone's ACKs of answer pieces for the other gateways."""
        if not ids:
            return
        async with self._client.pipeline(transaction=False) as pipe:
            for message_id in ids:
                key = _key("dack", device_id, message_id.hex())
                pipe.set(key, b"1", ex=self._dack_ttl)
            await self._execute(pipe)

    async def downlink_acked(
        self, device_id: bytes, ids: Sequence[bytes]
    ) -> set[bytes]:
        """Return which of ``ids`` any gateway saw the phone acknowledge."""
        if not ids:
            return set()
        keys = [_key("dack", device_id, message_id.hex()) for message_id in ids]
        try:
            async with asyncio.timeout(self._timeout_s):
                values = await self._client.mget(keys)
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailableError(f"redis store {self._url}: {exc!r}") from exc
        return {
            mid for mid, value in zip(ids, values, strict=True) if value is not None
        }

    async def _execute(self, pipe: aioredis.client.Pipeline) -> list[object]:
        try:
            async with asyncio.timeout(self._timeout_s):
                replies: list[object] = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailableError(f"redis store {self._url}: {exc!r}") from exc
        return replies


def _key(kind: str, device_id: bytes, rest: str) -> str:
    return f"{_NAMESPACE}:{kind}:{device_id.hex()}:{rest}"


def _verdict(entry: Entry, reply: object) -> Admission:
    if entry.part is None:
        return Admission(Outcome.NEW if reply else Outcome.DUPLICATE)
    if not isinstance(reply, list) or not reply:
        raise StoreUnavailableError("redis store: unexpected script reply")
    code = reply[0]
    if code == 0:
        return Admission(Outcome.DUPLICATE)
    if code == 1:
        return Admission(Outcome.NEW)
    if code == 3:
        return Admission(Outcome.REFUSED)
    fields = reply[1] if len(reply) > 1 and isinstance(reply[1], list) else []
    return Admission(
        Outcome.NEW, _assemble(entry.device_id, entry.part.request_id, fields)
    )


def _assemble(device_id: bytes, request_id: int, flat: list[object]) -> Assembled:
    parts = {
        name: value
        for name, value in zip(flat[::2], flat[1::2], strict=True)
        if isinstance(name, bytes) and isinstance(value, bytes)
    }
    media_kind: PartKind | None = None
    media = b""
    try:
        request = parts[b"r"]
        if b"t" not in parts:
            last = int(parts[b"l"])
            media = b"".join(parts[b"c:%d" % index] for index in range(last + 1))
            media_kind = PartKind(int(parts[b"k"]))
    except (KeyError, ValueError) as exc:
        raise StoreUnavailableError("redis store: inconsistent request parts") from exc
    return Assembled(
        device_id,
        request_id,
        request[:_MESSAGE_ID_SIZE],
        request[_MESSAGE_ID_SIZE:],
        media_kind,
        media,
    )
