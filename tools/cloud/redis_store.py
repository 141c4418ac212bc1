"""The Redis idempotency store, for gateways sharing one device's traffic.

Same contract as :class:`tools.cloud.store.SqliteStore` (see
:mod:`tools.cloud.store`). Keys, all with a TTL (``idempotency_ttl_s`` unless
said otherwise)::

    gr:seen:{device hex}:{message id hex}   "1"
    gr:asm:{device hex}:{request id}        hash  assembly_ttl_s, renewed per part
        r      REQUEST message id || body
        t      present: the REQUEST is complete by itself
        c:{i}  chunk i's media bytes
        l      index of the FINAL chunk
        n      number of chunks stored
        b      media bytes stored
        k      media kind of the chunks ("1" audio, "2" photo)
    gr:owe:{device hex}:{request hex}       hash: an answer owed; the assembly
                                            hash renamed, plus
        q      request id
        o      owner (gateway id); absent: cancelled (then only "z" is left)
        p:{s}  piece s: message id || "1" if FINAL else "0" || envelope (the
               envelope is cut off once the phone ACKed the piece)
        f      index of the FINAL piece, once saved (then "r" and "c:*" go)
        a      pieces the phone ACKed; the record goes when a > f
    gr:owes:{device hex}                    set of {request hex} owed
    gr:pc:{device hex}:{piece id hex}       "{request hex}:{s}": piece -> record
    gr:resp:{device hex}:{request hex}      "1": its response line is written
    gr:gws                                  set of gateway ids owning records
    gr:gw:{gateway id}                      "1", the heartbeat, TTL the lease
    gr:gwo:{gateway id}                     set of "{device hex}:{request hex}"
    gr:dack:{device hex}:{message id hex}   "1"   downlink_ttl_s (answer ACKed)

A message without a part is admitted with ``SET key 1 NX EX ttl``; a request
part with one Lua script that does the set-if-absent, stores the part, and,
if the request is now complete, returns every part and renames the hash into
the answer owed, all in one atomic step. A batch is one pipelined round trip.
Saving a piece, the phone's ACKs, claims and cancels are one Lua script each.
A gateway is dead when its heartbeat expired; ``claim_orphans`` hands its
records to the caller, atomically, so exactly one gateway takes each over.
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
    OwedAnswer,
    PartKind,
    StoredPiece,
    StoreLimits,
    StoreUnavailableError,
)

__all__ = ["RedisStore"]

logger = logging.getLogger(__name__)

_NS: Final = "gr:"
_MESSAGE_ID_SIZE: Final = 16
_ACKED_SIZE: Final = _MESSAGE_ID_SIZE + 1
"""A piece value cut to its message id and FINAL flag: acknowledged."""

# KEYS[1] seen key, KEYS[2] assembly hash, KEYS[3] the device's owed set.
# ARGV[1] seen TTL, ARGV[2] assembly TTL, ARGV[3] field ("r" or "c:<i>"),
# ARGV[4] data, ARGV[5] "1" if final (chunk) or complete alone (REQUEST),
# ARGV[6] chunk index, ARGV[7] media kind, ARGV[8] max media bytes,
# ARGV[9] owner, ARGV[10] owed-record key prefix, ARGV[11] request id,
# ARGV[12] the owner's record set, ARGV[13] "{device hex}:", ARGV[14] gateways.
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
local mid = string.sub(redis.call('HGET', asm, 'r'), 1, 16)
local req = string.gsub(mid, '.', function(c)
  return string.format('%02x', string.byte(c))
end)
local owe = ARGV[10] .. req
redis.call('RENAME', asm, owe)
redis.call('HSET', owe, 'q', ARGV[11], 'o', ARGV[9])
redis.call('EXPIRE', owe, ARGV[1])
redis.call('SADD', KEYS[3], req)
redis.call('EXPIRE', KEYS[3], ARGV[1])
if ARGV[9] ~= '' then
  redis.call('SADD', ARGV[12], ARGV[13] .. req)
  redis.call('EXPIRE', ARGV[12], ARGV[1])
  redis.call('SADD', ARGV[14], ARGV[9])
  redis.call('EXPIRE', ARGV[14], ARGV[1])
end
return {2, redis.call('HGETALL', owe)}
"""

# KEYS[1] owed record, KEYS[2] piece -> record key. ARGV[1] owner, ARGV[2]
# index, ARGV[3] value, ARGV[4] "1" if FINAL, ARGV[5] "{request hex}:{index}",
# ARGV[6] TTL. Returns {0} no record, {1} not the owner's (stop), {2, value}.
_SAVE_SCRIPT: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
if redis.call('HGET', KEYS[1], 'o') ~= ARGV[1] then return {1} end
local field = 'p:' .. ARGV[2]
local saved = redis.call('HGET', KEYS[1], field)
if saved then return {2, saved} end
if redis.call('HEXISTS', KEYS[1], 'f') == 1 then return {1} end
redis.call('HSET', KEYS[1], field, ARGV[3])
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], 'f', ARGV[2])
  for _, name in ipairs(redis.call('HKEYS', KEYS[1])) do
    if name == 'r' or string.sub(name, 1, 2) == 'c:' then
      redis.call('HDEL', KEYS[1], name)
    end
  end
end
redis.call('SET', KEYS[2], ARGV[5], 'EX', ARGV[6])
return {2, ARGV[3]}
"""

# ARGV[1] namespace, ARGV[2] device hex, ARGV[3] dack TTL, ARGV[4..] piece ids.
_ACK_SCRIPT: Final = """
local ns, dev = ARGV[1], ARGV[2]
for i = 4, #ARGV do
  redis.call('SET', ns .. 'dack:' .. dev .. ':' .. ARGV[i], '1', 'EX', ARGV[3])
  local pc = ns .. 'pc:' .. dev .. ':' .. ARGV[i]
  local ref = redis.call('GET', pc)
  if ref then
    redis.call('DEL', pc)
    local req, seq = string.match(ref, '^(%x+):(%d+)$')
    local owe = ns .. 'owe:' .. dev .. ':' .. req
    local value = redis.call('HGET', owe, 'p:' .. seq)
    if value and string.len(value) > 17 then
      redis.call('HSET', owe, 'p:' .. seq, string.sub(value, 1, 17))
      local acked = redis.call('HINCRBY', owe, 'a', 1)
      local last = redis.call('HGET', owe, 'f')
      if last and acked > tonumber(last) then
        local owner = redis.call('HGET', owe, 'o')
        redis.call('DEL', owe)
        redis.call('SREM', ns .. 'owes:' .. dev, req)
        if owner and owner ~= '' then
          redis.call('SREM', ns .. 'gwo:' .. owner, dev .. ':' .. req)
        end
      end
    end
  end
end
return 0
"""

# ARGV[1] namespace, ARGV[2] device hex, ARGV[3] claimer, ARGV[4] "1": steal,
# ARGV[5] TTL. Returns the request hexes now the claimer's.
_CLAIM_SCRIPT: Final = """
local ns, dev, me = ARGV[1], ARGV[2], ARGV[3]
local index = ns .. 'owes:' .. dev
local mine = ns .. 'gwo:' .. me
local out = {}
for _, req in ipairs(redis.call('SMEMBERS', index)) do
  local owe = ns .. 'owe:' .. dev .. ':' .. req
  local owner = redis.call('HGET', owe, 'o')
  if not owner then
    redis.call('SREM', index, req)
  elseif owner == me or owner == '' or ARGV[4] == '1'
      or redis.call('EXISTS', ns .. 'gw:' .. owner) == 0 then
    if owner ~= me then
      redis.call('HSET', owe, 'o', me)
      if owner ~= '' then
        redis.call('SREM', ns .. 'gwo:' .. owner, dev .. ':' .. req)
      end
      redis.call('SADD', mine, dev .. ':' .. req)
      redis.call('EXPIRE', mine, ARGV[5])
      redis.call('SADD', ns .. 'gws', me)
      redis.call('EXPIRE', ns .. 'gws', ARGV[5])
    end
    table.insert(out, req)
  end
end
return out
"""

# ARGV[1] namespace, ARGV[2] claimer, ARGV[3] limit, ARGV[4] TTL.
# Returns up to limit "{device hex}:{request hex}" taken from dead gateways.
_ORPHANS_SCRIPT: Final = """
local ns, me = ARGV[1], ARGV[2]
local limit = tonumber(ARGV[3])
local gws = ns .. 'gws'
local mine = ns .. 'gwo:' .. me
local out = {}
for _, gid in ipairs(redis.call('SMEMBERS', gws)) do
  if #out >= limit then break end
  if gid ~= me and redis.call('EXISTS', ns .. 'gw:' .. gid) == 0 then
    local owned = ns .. 'gwo:' .. gid
    while #out < limit do
      local ref = redis.call('SPOP', owned)
      if not ref then break end
      local owe = ns .. 'owe:' .. ref
      if redis.call('HGET', owe, 'o') == gid then
        redis.call('HSET', owe, 'o', me)
        redis.call('SADD', mine, ref)
        table.insert(out, ref)
      end
    end
    if redis.call('SCARD', owned) == 0 then redis.call('SREM', gws, gid) end
  end
end
if #out > 0 then
  redis.call('EXPIRE', mine, ARGV[4])
  redis.call('SADD', gws, me)
  redis.call('EXPIRE', gws, ARGV[4])
end
return out
"""

# ARGV[1] namespace, ARGV[2] device hex, ARGV[3] request id, ARGV[4] TTL.
_CANCEL_SCRIPT: Final = """
local ns, dev = ARGV[1], ARGV[2]
local index = ns .. 'owes:' .. dev
for _, req in ipairs(redis.call('SMEMBERS', index)) do
  local owe = ns .. 'owe:' .. dev .. ':' .. req
  if redis.call('HGET', owe, 'q') == ARGV[3]
      and redis.call('HEXISTS', owe, 'f') == 0 then
    local owner = redis.call('HGET', owe, 'o')
    redis.call('DEL', owe)
    redis.call('HSET', owe, 'z', '1')
    redis.call('EXPIRE', owe, ARGV[4])
    redis.call('SREM', index, req)
    if owner and owner ~= '' then
      redis.call('SREM', ns .. 'gwo:' .. owner, dev .. ':' .. req)
    end
  end
end
return 0
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

    async def admit(
        self, entries: Sequence[Entry], *, owner: str = ""
    ) -> list[Admission]:
        """See :meth:`tools.cloud.store.IdempotencyStore.admit`."""
        if not entries:
            return []
        async with self._client.pipeline(transaction=False) as pipe:
            return await self._admit(pipe, entries, owner)

    async def _admit(
        self, pipe: aioredis.client.Pipeline, entries: Sequence[Entry], owner: str
    ) -> list[Admission]:
        for entry in entries:
            seen = _key("seen", entry.device_id, entry.message_id.hex())
            part = entry.part
            if part is None:
                pipe.set(seen, b"1", nx=True, ex=self._seen_ttl)
                continue
            is_request = part.kind is PartKind.REQUEST
            device = entry.device_id.hex()
            pipe.eval(
                _PART_SCRIPT,
                3,
                seen,
                _key("asm", entry.device_id, str(part.request_id)),
                f"{_NS}owes:{device}",
                self._seen_ttl,
                self._asm_ttl,
                "r" if is_request else f"c:{part.index}",
                part.data,
                "1" if part.final else "0",
                part.index,
                int(part.kind),
                self._limits.max_request_bytes,
                owner,
                f"{_NS}owe:{device}:",
                part.request_id,
                f"{_NS}gwo:{owner}",
                f"{device}:",
                f"{_NS}gws",
            )
        replies = await self._execute(pipe)
        return [
            _verdict(entry, reply)
            for entry, reply in zip(entries, replies, strict=True)
        ]

    async def save_piece(
        self, device_id: bytes, request: bytes, piece: StoredPiece, *, owner: str
    ) -> StoredPiece | None:
        """See :meth:`tools.cloud.store.IdempotencyStore.save_piece`."""
        value = piece.message_id + (b"1" if piece.final else b"0") + piece.envelope
        (reply,) = await self._one(
            "eval",
            _SAVE_SCRIPT,
            2,
            _key("owe", device_id, request.hex()),
            _key("pc", device_id, piece.message_id.hex()),
            owner,
            piece.seq,
            value,
            "1" if piece.final else "0",
            f"{request.hex()}:{piece.seq}",
            self._seen_ttl,
        )
        if not isinstance(reply, list) or not reply:
            raise StoreUnavailableError("redis store: unexpected script reply")
        if reply[0] == 0:
            return piece
        if reply[0] == 1 or len(reply) < 2 or not isinstance(reply[1], bytes):
            return None
        return _piece(piece.seq, reply[1])

    async def mark_downlink_acked(self, device_id: bytes, ids: Sequence[bytes]) -> None:
        """Record the phone's ACKs (module docstring) for every gateway."""
        if not ids:
            return
        await self._one(
            "eval",
            _ACK_SCRIPT,
            0,
            _NS,
            device_id.hex(),
            self._dack_ttl,
            *(message_id.hex() for message_id in ids),
        )

    async def downlink_acked(
        self, device_id: bytes, ids: Sequence[bytes]
    ) -> set[bytes]:
        """Return which of ``ids`` any gateway saw the phone acknowledge."""
        if not ids:
            return set()
        keys = [_key("dack", device_id, message_id.hex()) for message_id in ids]
        (values,) = await self._one("mget", keys)
        if not isinstance(values, list):
            raise StoreUnavailableError("redis store: unexpected MGET reply")
        return {
            mid for mid, value in zip(ids, values, strict=True) if value is not None
        }

    async def claim_owed(
        self, device_id: bytes, *, owner: str, steal: bool
    ) -> list[OwedAnswer]:
        """See :meth:`tools.cloud.store.IdempotencyStore.claim_owed`."""
        device = device_id.hex()
        (reqs,) = await self._one(
            "eval",
            _CLAIM_SCRIPT,
            0,
            _NS,
            device,
            owner,
            "1" if steal else "0",
            self._seen_ttl,
        )
        refs = [f"{device}:{req.decode()}" for req in _bytes_list(reqs)]
        return await self._load(refs)

    async def claim_orphans(self, *, owner: str, limit: int) -> list[OwedAnswer]:
        """See :meth:`tools.cloud.store.IdempotencyStore.claim_orphans`."""
        (refs,) = await self._one(
            "eval", _ORPHANS_SCRIPT, 0, _NS, owner, limit, self._seen_ttl
        )
        return await self._load([ref.decode() for ref in _bytes_list(refs)])

    async def heartbeat(self, *, owner: str, lease_s: float) -> None:
        """Set ``owner``'s heartbeat key for ``lease_s``."""
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.set(f"{_NS}gw:{owner}", b"1", px=max(1, round(lease_s * 1000)))
            await self._execute(pipe)

    async def claim_response(self, device_id: bytes, request: bytes) -> bool:
        """``SET gr:resp:... NX``: whether this call set it."""
        key = _key("resp", device_id, request.hex())
        (reply,) = await self._one("set", key, b"1", nx=True, ex=self._seen_ttl)
        return bool(reply)

    async def cancel_answer(self, device_id: bytes, request_id: int) -> None:
        """See :meth:`tools.cloud.store.IdempotencyStore.cancel_answer`."""
        await self._one(
            "eval",
            _CANCEL_SCRIPT,
            0,
            _NS,
            device_id.hex(),
            str(request_id),
            self._seen_ttl,
        )

    async def _load(self, refs: list[str]) -> list[OwedAnswer]:
        """Read the owed records ``{device hex}:{request hex}``."""
        if not refs:
            return []
        async with self._client.pipeline(transaction=False) as pipe:
            for ref in refs:
                pipe.hgetall(f"{_NS}owe:{ref}")
            replies = await self._execute(pipe)
        out: list[OwedAnswer] = []
        for ref, fields in zip(refs, replies, strict=True):
            device, _, request = ref.partition(":")
            if not isinstance(fields, dict) or fields.get(b"o") is None:
                continue  # finished or cancelled since
            try:
                out.append(_owed(bytes.fromhex(device), bytes.fromhex(request), fields))
            except (StoreUnavailableError, ValueError):
                logger.warning("redis store: skipped an inconsistent answer owed")
        return out

    async def _one(self, command: str, *args: object, **kwargs: object) -> list[object]:
        """Run one command in a pipeline (one bounded round trip)."""
        async with self._client.pipeline(transaction=False) as pipe:
            getattr(pipe, command)(*args, **kwargs)
            return await self._execute(pipe)

    async def _execute(self, pipe: aioredis.client.Pipeline) -> list[object]:
        try:
            async with asyncio.timeout(self._timeout_s):
                replies: list[object] = await pipe.execute()
                _raise_swallowed_cancel()
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailableError(f"redis store {self._url}: {exc!r}") from exc
        return replies


def _raise_swallowed_cancel() -> None:
    """Raise the cancellation ``asyncio.wait_for`` swallowed, if it did.

    redis-py bounds its socket reads and writes with ``asyncio.wait_for``,
    which on Python 3.11 returns the result instead of raising when the task
    is cancelled just as the inner await completes (CPython gh-86296), so a
    gateway told to stop could go on waiting forever.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _key(kind: str, device_id: bytes, rest: str) -> str:
    return f"{_NS}{kind}:{device_id.hex()}:{rest}"


def _bytes_list(reply: object) -> list[bytes]:
    if not isinstance(reply, list):
        raise StoreUnavailableError("redis store: unexpected script reply")
    return [item for item in reply if isinstance(item, bytes)]


def _piece(seq: int, value: bytes) -> StoredPiece:
    return StoredPiece(
        seq,
        value[:_MESSAGE_ID_SIZE],
        value[_MESSAGE_ID_SIZE:_ACKED_SIZE] == b"1",
        value[_ACKED_SIZE:],
    )


def _owed(device_id: bytes, request: bytes, fields: dict[object, object]) -> OwedAnswer:
    values = {
        name: value
        for name, value in fields.items()
        if isinstance(name, bytes) and isinstance(value, bytes)
    }
    pieces = sorted(
        (
            _piece(int(name[2:]), value)
            for name, value in values.items()
            if name.startswith(b"p:") and name[2:].isdigit()
        ),
        key=lambda piece: piece.seq,
    )
    request_id = int(values.get(b"q", b"0"))
    assembled: Assembled | None = None
    if b"f" not in values:
        flat: list[object] = [x for pair in values.items() for x in pair]
        assembled = _assemble(device_id, request_id, flat)
    return OwedAnswer(device_id, request, request_id, assembled, tuple(pieces))


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
