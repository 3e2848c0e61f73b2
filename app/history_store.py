"""Where the query history lives: fingerprints only (never an image), bounded, with expiry.

The history is one table of `slots` 64-bit slots (table_slots: a size in MB), direct-mapped: a
window hash h of a query goes to slot h mod slots and is stored there as (the hash's high bits, the
query's random id, the second it was stored). Looking a fingerprint up and storing it are one
step: each of its hashes is written to its slot, and the values the slots held say which
earlier query had how many of the same hashes within `ttl_s` (`best_match`). A new
hash overwrites whatever was in its slot, so the table never grows: memory is 8 bytes a slot,
whatever the traffic, and an old entry lives until its slot is taken or it expires.

Exact repeats (the same model input again: retries, caches) are remembered by a keyed digest,
with the decision the first one got, for `ttl_s`, at most `exact_capacity` of them.

- LocalStore: one process's NumPy table and an LRU of digests (`make serve`, one worker).
- SharedStore: the same table as a file every worker of one host maps (a directory on tmpfs,
  like Prometheus's multiprocess one), the digests in a second direct-mapped table beside it,
  the salt in a file the first worker writes: the workers of one host share one history.
- RedisStore: the same table as one Redis string, digests as keys with an expiry; a request's
  inputs are judged by one Lua script (one atomic round trip: the digests looked up and set, a
  BITFIELD per input whose SETs return each slot's old value: lookup and insert in one step); every
  worker and replica pointed at the same Redis shares one history, so an attack spread over them
  is seen as one.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

# A slot: the hash's high 20 bits (its tag), the query's random 24-bit id, the second it was
# stored (20 bits: the clock wraps every 12 days, so ttl_s is at most 6 days).
TAG_BITS, ID_BITS, TIME_BITS = 20, 24, 20
MAX_TTL_S = 1 << (TIME_BITS - 1)
_TIME_MASK = np.uint64((1 << TIME_BITS) - 1)
_ID_MASK = np.uint64((1 << ID_BITS) - 1)
_TAG_SHIFT = np.uint64(ID_BITS + TIME_BITS)
_TIME_SHIFT = np.uint64(TIME_BITS)
SLOT_BYTES = 8
# Redis: BITFIELD's bit offset is below 2^32 (a string holds at most 512 MiB), so 2^26 i64 slots at most.
REDIS_MAX_SLOTS = 1 << 26


def table_slots(table_mb: float) -> int:
    """The slots of a table of `table_mb` megabytes (10^6 bytes)."""
    return max(1, int(table_mb * 1_000_000) // SLOT_BYTES)


class StoreUnavailable(Exception):
    """The shared store cannot be reached; the service goes on without the history."""


def pack(hashes: NDArray[np.uint64], query_id: int, now_s: int) -> NDArray[np.uint64]:
    """Each hash's slot value: its tag, the query's id, the second it was stored."""
    stamp = (query_id << TIME_BITS) | (now_s & ((1 << TIME_BITS) - 1))
    return ((hashes >> _TAG_SHIFT) << _TAG_SHIFT) | np.uint64(stamp)


def best_match(hashes: NDArray[np.uint64], old: NDArray[np.uint64], now_s: int, ttl_s: float) -> int:
    """The most hashes of this fingerprint that one earlier query (within ttl_s) also had, from
    the old values of their slots: the fingerprints' overlap with their nearest stored one."""
    match = (((old ^ hashes) >> _TAG_SHIFT) == 0) & (old != 0)  # the same tag, in a slot that was taken
    age = (np.uint64(now_s & ((1 << TIME_BITS) - 1)) - (old & _TIME_MASK)) & _TIME_MASK  # seconds, mod 2^TIME_BITS
    match &= age <= ttl_s
    ids = (old[match] >> _TIME_SHIFT) & _ID_MASK
    return Counter(ids.tolist()).most_common(1)[0][1] if len(ids) else 0


Prints = Callable[[list[int]], NDArray[np.uint64]]  # rows (of a request's distinct inputs) -> their fingerprints


class HistoryStore(Protocol):
    kind: str

    async def check(self, digests: list[bytes], prints: Prints, ids: list[int]) -> tuple[list[bool | None], list[bool]]:
        """The judgement of a request's distinct inputs in one step: for each digest, the decision its
        first query got (None: new), and for each new input its decision: an attack query when one
        earlier query had at least the store's `threshold` of its hashes (`prints` of its row, stored
        under `ids` of its row). A new input is remembered with its decision in the same step: a copy
        of an attack query, however soon it follows, is known as one, never as a benign repeat that
        gets the model's answer."""
        ...

    async def size(self) -> tuple[int, int]:
        """(occupied slots, bytes) of the table."""
        ...

    async def close(self) -> None: ...


class LocalStore:
    kind = "memory"

    def __init__(self, slots: int, ttl_s: float, exact_capacity: int, threshold: int) -> None:
        self.table = np.zeros(slots, np.uint64)
        self.slots = np.uint64(slots)
        self.ttl_s = ttl_s
        self.threshold = threshold
        self.exact_capacity = exact_capacity
        self._exact: OrderedDict[bytes, tuple[bool, float]] = OrderedDict()
        self._occupied = 0

    async def check(self, digests: list[bytes], prints: Prints, ids: list[int]) -> tuple[list[bool | None], list[bool]]:
        """HistoryStore.check in steps (this host's memory: no round trips to save); only new inputs are
        fingerprinted."""
        known = await self.repeated(digests)
        new = [j for j, k in enumerate(known) if k is None]
        attacks = [False] * len(digests)
        if new:
            for j, row in zip(new, prints(new), strict=True):
                attacks[j] = await self.record(row, ids[j]) >= self.threshold
            await self.remember([digests[j] for j in new], [attacks[j] for j in new])
        return known, attacks

    async def record(self, fingerprint: NDArray[np.uint64], query_id: int) -> int:
        """Store one fingerprint; the most of its hashes one earlier (fresh) query had."""
        now = int(time.time())
        h = fingerprint[fingerprint != 0]
        slots = (h % self.slots).astype(np.intp)
        old = self.table[slots]
        self._occupied += int(np.count_nonzero(old == 0))
        self.table[slots] = pack(h, query_id, now)
        return best_match(h, old, now, self.ttl_s)

    async def repeated(self, digests: list[bytes]) -> list[bool | None]:
        now, out = time.monotonic(), []
        for d in digests:
            hit = self._exact.get(d)
            if hit is not None and now - hit[1] > self.ttl_s:
                del self._exact[d]
                hit = None
            out.append(None if hit is None else hit[0])
        return out

    async def remember(self, digests: list[bytes], attacks: list[bool]) -> None:
        now = time.monotonic()
        for d, a in zip(digests, attacks, strict=True):
            self._exact[d] = (a, now)
            self._exact.move_to_end(d)
        while len(self._exact) > self.exact_capacity:
            self._exact.popitem(last=False)

    async def size(self) -> tuple[int, int]:
        return self._occupied, int(self.table.nbytes)

    async def close(self) -> None:
        return None


class SharedStore(LocalStore):
    """LocalStore's table in a file of `directory` that every process maps (np.memmap); exact
    repeats in a direct-mapped table of 2^exact_log2 slots (a digest's top 40 bits, its decision,
    the second it was stored). Concurrent writers may lose a slot's update to each other, as a
    direct-mapped table loses old entries anyway: a query still matches on its other hashes."""

    kind = "shared"
    TABLE, EXACT, SALT = "query-history-table-{}.u64", "query-history-exact-{}.u64", "query-history-salt"

    def __init__(self, directory: Path, slots: int, ttl_s: float, threshold: int, exact_log2: int = 20) -> None:
        super().__init__(0, ttl_s, 0, threshold)
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.table = _mapped(directory / self.TABLE.format(slots), slots)
        self.slots = np.uint64(slots)
        self.exact = _mapped(directory / self.EXACT.format(exact_log2), 1 << exact_log2)
        self.exact_mask = (1 << exact_log2) - 1

    def shared_salt(self, candidate: bytes) -> bytes:
        """The first process's `candidate`, written once (O_EXCL) and read by the others."""
        path = self.directory / self.SALT
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            for _ in range(50):  # the first process may still be writing it
                salt = path.read_bytes()
                if len(salt) == len(candidate):
                    return salt
                time.sleep(0.01)
            raise StoreUnavailable(f"{path}: no complete salt") from None
        with os.fdopen(fd, "wb") as f:
            f.write(candidate)
        return candidate

    async def repeated(self, digests: list[bytes]) -> list[bool | None]:
        now, out = int(time.time()), []
        for d in digests:
            slot, tag = self._slot(d)
            v = int(self.exact[slot])
            fresh = v and (now - (v & _EXACT_TIME)) % (1 << 22) <= self.ttl_s
            out.append(bool(v & _EXACT_DECISION) if fresh and v >> 24 == tag else None)
        return out

    async def remember(self, digests: list[bytes], attacks: list[bool]) -> None:
        now = int(time.time())
        for d, a in zip(digests, attacks, strict=True):
            slot, tag = self._slot(d)
            self.exact[slot] = np.uint64((tag << 24) | (_EXACT_DECISION if a else 0) | (now & _EXACT_TIME))

    def _slot(self, digest: bytes) -> tuple[int, int]:
        v = int.from_bytes(digest[:8], "little")
        return v & self.exact_mask, v >> 24

    async def size(self) -> tuple[int, int]:
        return int(np.count_nonzero(self.table)), int(self.table.nbytes)


_EXACT_DECISION = 1 << 23
_EXACT_TIME = (1 << 22) - 1


def _mapped(path: Path, slots: int) -> NDArray[np.uint64]:
    """A file of `slots` zero-initialized uint64 slots, mapped; made (or grown) by whoever is first."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size < slots * 8:
            os.ftruncate(fd, slots * 8)
    finally:
        os.close(fd)
    return np.memmap(path, np.uint64, mode="r+", shape=(slots,))


# The most inputs one check script judges for several requests (a request alone may have more).
_BATCH_INPUTS = 512


@dataclass
class _Waiting:
    """A request's part of a check script: its inputs' digests, their slots and values (the script's
    binary argument), and where its share of the answer goes."""

    digests: list[bytes]
    blob: bytes
    now: int  # the second its values are stamped with
    result: asyncio.Future[tuple[list[bytes | None], list[bool]]]


class RedisStore:
    kind = "redis"
    TABLE = "dsphere:qh:table"
    EXACT = "dsphere:qh:x:"
    SALT = "dsphere:qh:salt"

    def __init__(self, url: str, slots: int, ttl_s: float, threshold: int, timeout_s: float = 1.0) -> None:
        import redis.asyncio as redis  # only where Redis is configured

        self._errors = (redis.RedisError, OSError)
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        if slots > REDIS_MAX_SLOTS:
            raise ValueError(f"a Redis table holds at most {REDIS_MAX_SLOTS} slots, not {slots}")
        self.slots = np.uint64(slots)
        self._check = self.client.register_script(_CHECK_LUA)  # EVALSHA, loaded again after a restart
        self.ttl_s = ttl_s
        self._expiry_s, self._ttl_arg = max(1, int(ttl_s)), repr(float(ttl_s))  # the script's ARGV[1] and [5]
        self.threshold = threshold  # an input sharing this many hashes with one earlier query: an attack query
        self._new_slots = 0  # slots this process filled since it last told Redis
        self._waiting: list[_Waiting] = []  # requests whose check is not sent yet
        self._sender: asyncio.Task[None] | None = None

    async def shared_salt(self, candidate: bytes) -> bytes:
        """The salt every worker and replica uses: the first one's `candidate`, kept in Redis."""
        async with self._guard():
            await self.client.set(self.SALT, candidate, nx=True)
            salt = await self.client.get(self.SALT)
        if not isinstance(salt, bytes):
            raise StoreUnavailable("redis holds no query-history salt")
        return salt

    async def check(self, digests: list[bytes], prints: Prints, ids: list[int]) -> tuple[list[bool | None], list[bool]]:
        """One round trip, atomic (a Lua script: no other process's commands in between): MGET the
        digests, SET NX each as benign, one BITFIELD per input whose old values give its overlap, and
        a new input whose overlap reaches the threshold decided and remembered as an attack there and
        then (a copy of it, from any process, is known as one from the next command on). The slots and values
        travel as one binary argument (a command of 200 arguments per input costs the client more
        than the rest of the judgement). Every input is fingerprinted and stored, a repeat too (its
        own hashes again, under a new id: its earlier entries refreshed); a repeat's overlap is not
        read (its decision is the first one's). The requests that wait while a script runs go together
        in the next one (`_send_waiting`)."""
        if not digests:
            return [], []
        now = int(time.time())
        hashes = [row[row != 0] for row in prints(list(range(len(digests))))]
        parts = []
        for h, query_id in zip(hashes, ids, strict=True):
            words = np.empty((len(h), 3), "<u4")
            words[:, 0] = (h % self.slots).astype(np.uint32)
            values = pack(h, query_id, now)
            words[:, 1], words[:, 2] = values >> np.uint64(32), values & np.uint64(0xFFFFFFFF)
            parts += [np.uint32(len(h)).astype("<u4").tobytes(), words.tobytes()]
        request = _Waiting(digests, b"".join(parts), now, asyncio.get_running_loop().create_future())
        self._waiting.append(request)
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_waiting())
        known_raw, attacks = await request.result
        return [None if v is None else v == b"1" for v in known_raw], attacks

    async def _send_waiting(self) -> None:
        """The check script for the waiting requests, in their order, as many at once as may go
        together (`_take_batch`), until none waits: under load one round trip serves many requests
        (the round trip's system calls and the client's work, not Redis, are what a check costs)."""
        while self._waiting:
            batch = self._take_batch()
            keys = [self.EXACT + d.hex() for w in batch for d in w.digests]
            args: list[bytes | int | str] = [self._expiry_s, b"".join(w.blob for w in batch), batch[0].now,
                                             self.threshold, self._ttl_arg]
            try:
                async with self._guard():
                    known_raw, attacks, empty = await self._check(keys=[self.TABLE, *keys], args=args)
            except Exception as exc:  # the store's error is each request's
                for w in batch:
                    if not w.result.done():
                        w.result.set_exception(exc)
                continue
            except BaseException:  # the sender cancelled (the store closing): so is every request it holds
                for w in batch + self._waiting:
                    w.result.cancel()
                self._waiting = []
                raise
            self._new_slots += int(empty)
            k = 0
            for w in batch:
                if not w.result.done():  # a request cancelled meanwhile (its client went away) is not answered
                    end = k + len(w.digests)
                    w.result.set_result((known_raw[k:end], [a == 1 for a in attacks[k:end]]))
                k += len(w.digests)

    def _take_batch(self) -> list[_Waiting]:
        """The first waiting requests, in order, up to the first that may not join them: one that would
        pass `_BATCH_INPUTS` inputs, one that shares an input with them (its MGET must see their SET
        NX and a flag, as it would one round trip later: the same input twice in one script would be
        judged new twice, and the second a near-copy of the first), or one stamped in another second
        (the script measures every age from one `now`)."""
        seen: set[bytes] = set()
        n = 0
        for i, w in enumerate(self._waiting):
            joins = n + len(w.digests) <= _BATCH_INPUTS and seen.isdisjoint(w.digests) and w.now == self._waiting[0].now
            if i and not joins:
                break
            seen.update(w.digests)
            n += len(w.digests)
        else:
            i = len(self._waiting)
        batch, self._waiting = self._waiting[:i], self._waiting[i:]
        return batch

    async def size(self) -> tuple[int, int]:
        async with self._guard():
            new, self._new_slots = self._new_slots, 0
            used = int(await self.client.incrby(self.TABLE + ":occupied", new))
            nbytes = int(await self.client.strlen(self.TABLE))
        return used, nbytes

    async def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
        await self.client.aclose()

    def _guard(self) -> _Guard:
        return _Guard(self._errors)


# RedisStore.check on the server. KEYS: the table, then each input's digest key. ARGV: [1] the digests'
# expiry (s); [2] per input, a little-endian uint32 count n, then n × (slot, value's high 32 bits, low 32
# bits); [3] now (s), the second every value is stamped with; [4] the threshold; [5] ttl_s. Each 64-bit
# slot is written as two u32 fields (the i64 slot #k is u32 #2k and #2k+1: BITFIELD is big-endian), so
# every number Lua handles is exact in its doubles. A slot's halves: high = tag (20 bits) · 2^12 + the
# id's high 12 bits, low = the id's low 12 bits · 2^20 + the second (20 bits): best_match, in Lua. Returns
# the MGET of the digests, each input's decision (1: an attack query; 0 for a repeat: not read) and how
# many slots were empty.
_CHECK_LUA = """
local known = redis.call('MGET', unpack(KEYS, 2))
for i = 2, #KEYS do
  redis.call('SET', KEYS[i], '0', 'EX', ARGV[1], 'NX')
end
local now, threshold, ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local blob, pos, input, attacks, empty = ARGV[2], 1, 1, {}, 0
while pos <= #blob do
  local n
  n, pos = struct.unpack('<I4', blob, pos)
  local best = 0
  if n > 0 then
    local args, tags = {}, {}
    for j = 1, n do
      local slot, hi, lo
      slot, hi, lo, pos = struct.unpack('<I4I4I4', blob, pos)
      tags[j] = math.floor(hi / 4096)
      args[#args + 1] = 'SET'; args[#args + 1] = 'u32'; args[#args + 1] = '#' .. (2 * slot); args[#args + 1] = hi
      args[#args + 1] = 'SET'; args[#args + 1] = 'u32'; args[#args + 1] = '#' .. (2 * slot + 1); args[#args + 1] = lo
    end
    local got = redis.call('BITFIELD', KEYS[1], unpack(args))
    local counts = {}
    for j = 1, n do
      local hi, lo = got[2 * j - 1], got[2 * j]
      if hi == 0 and lo == 0 then
        empty = empty + 1
      elseif math.floor(hi / 4096) == tags[j] and (now - lo % 1048576) % 1048576 <= ttl then
        local id = (hi % 4096) * 4096 + math.floor(lo / 1048576)
        local c = (counts[id] or 0) + 1
        counts[id] = c
        if c > best then best = c end
      end
    end
  end
  attacks[input] = 0
  if not known[input] and best >= threshold then
    redis.call('SET', KEYS[input + 1], '1', 'EX', ARGV[1])
    attacks[input] = 1
  end
  input = input + 1
end
return {known, attacks, empty}
"""


class _Guard:
    """Turns the client's errors into StoreUnavailable (one type for the detector to catch)."""

    def __init__(self, errors: tuple[type[BaseException], ...]) -> None:
        self.errors = errors

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if exc is not None and isinstance(exc, self.errors):
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from None
        return False
