"""The Redis sink's layout and rules: keys, hash fields, "latest" ranks and the script that applies a
batch to one symbol's keys. Pure code: no I/O (the script runs inside Redis, atomically per symbol).

- `collector:latest:<exchange>:<symbol>` (hash): fields `trade`, `ticker`, `bbo`, `kline:<interval>`,
  each the JSON of the latest record by event time, never by arrival.
- `collector:latest-rank:<exchange>:<symbol>` (hash): the rank each of those fields was written with,
  so a record replayed or delivered late never replaces a newer one.
- `collector:stream:<exchange>:<symbol>` (stream, optional): every record, `MAXLEN ~ streamMaxLen`.
- Every record is PUBLISHed on `market.<type>.<exchange>.<symbol>`, the name of its Kafka topic.

`<symbol>` is the topic's form (`btc-usdt`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec

from streams.records import Bbo, Kline, MarketRecord, Trade
from streams.topics import symbol_token

LATEST_PREFIX = "collector:latest:"
RANK_PREFIX = "collector:latest-rank:"
STREAM_PREFIX = "collector:stream:"
_EXACT_IN_LUA = 2**53  # Lua numbers are doubles
_CLOSED = 2**43  # above any epoch-ms event time until the year 2248


def latest_key(exchange: str, symbol: str) -> str:
    return f"{LATEST_PREFIX}{exchange}:{symbol_token(symbol)}"


def rank_key(exchange: str, symbol: str) -> str:
    return f"{RANK_PREFIX}{exchange}:{symbol_token(symbol)}"


def stream_key(exchange: str, symbol: str) -> str:
    return f"{STREAM_PREFIX}{exchange}:{symbol_token(symbol)}"


def latest_field(record: MarketRecord) -> str:
    data = record.data
    if isinstance(data, Kline):
        return f"kline:{data.interval}"
    return record.type


def _small_id(text: str) -> int:
    """A numeric id as a tie-breaker between records of the same millisecond (0 when not numeric)."""
    if text.isdigit() and text.isascii() and len(text) <= 16:
        value = int(text)
        return value if value < _EXACT_IN_LUA else 0
    return 0


def latest_rank(record: MarketRecord) -> tuple[int, int]:
    """Orders the records of one hash field: the higher rank is the later one.

    trade, ticker, bbo: event time, then the trade or update id within a millisecond; kline: the bar's
    start time, then closed over open, then event time (a closed bar beats a later update of itself).
    """
    data = record.data
    if isinstance(data, Kline):
        return data.start_time, (_CLOSED if data.closed else 0) + record.timestamp
    if isinstance(data, Trade):
        return record.timestamp, _small_id(data.trade_id)
    if isinstance(data, Bbo):
        return record.timestamp, _small_id(data.update_id)
    return record.timestamp, 0


@dataclass
class SymbolWrite:
    """One script call: every record of a batch for one exchange and symbol, in arrival order.

    Arguments: ttl, stream MAXLEN, the channel suffix `.<exchange>.<symbol>`, a JSON list of
    `[field, rank high, rank low]` per record, then the records' JSON, one argument each. (Six
    arguments per record cost more in redis-py's packing than everything else in the sink.)"""

    exchange: str
    symbol: str
    head: list[str]
    fields: list[tuple[str, str, str]] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)

    @property
    def records(self) -> int:
        return len(self.payloads)

    @property
    def keys(self) -> list[str]:
        return [
            latest_key(self.exchange, self.symbol),
            rank_key(self.exchange, self.symbol),
            stream_key(self.exchange, self.symbol),
        ]

    @property
    def args(self) -> list[str | bytes]:
        return [*self.head, _encoder.encode(self.fields).decode(), *self.payloads]

    def types(self) -> Counter[str]:
        return Counter(name.partition(":")[0] for name, _, _ in self.fields)


_encoder = msgspec.json.Encoder()


def plan_writes(
    items: Iterable[tuple[MarketRecord, bytes]], ttl_seconds: int | None, stream_max_len: int | None
) -> list[SymbolWrite]:
    """Group a batch's (record, its JSON as read from Kafka) by symbol into script calls."""
    writes: dict[tuple[str, str], SymbolWrite] = {}
    for record, payload in items:
        key = (record.exchange, record.symbol)
        write = writes.get(key)
        if write is None:
            suffix = f".{record.exchange}.{symbol_token(record.symbol)}"
            head = [str(ttl_seconds or 0), str(stream_max_len or 0), suffix]
            write = writes[key] = SymbolWrite(record.exchange, record.symbol, head)
        high, low = latest_rank(record)
        write.fields.append((latest_field(record), str(high), str(low)))
        write.payloads.append(payload)
    return list(writes.values())


def newest(ranked: Iterable[tuple[tuple[int, int], bytes]]) -> bytes | None:
    """What the script leaves in one field after these (rank, payload) pairs arrive in this order:
    the highest rank, the later arrival on a tie. The script's rule, in Python, for the tests."""
    best: tuple[tuple[int, int], bytes] | None = None
    for rank, payload in ranked:
        if best is None or rank >= best[0]:
            best = (rank, payload)
    return None if best is None else best[1]


# KEYS: latest hash, rank hash, stream. ARGV: ttl seconds (0: none), stream MAXLEN (0: no stream),
# channel suffix, JSON [[field, rank high, rank low], ...], then each record's JSON. The record's type is
# its field up to a colon (`kline:1m` → kline); its channel `market.<type><suffix>`.
APPLY_SCRIPT = """
local ttl = tonumber(ARGV[1])
local maxlen = tonumber(ARGV[2])
local suffix = ARGV[3]
local fields = cjson.decode(ARGV[4])
local high, low, payload, rank = {}, {}, {}, {}
for n, entry in ipairs(fields) do
  local field, h, l, body = entry[1], tonumber(entry[2]), tonumber(entry[3]), ARGV[4 + n]
  local kind = string.match(field, '^[^:]+')
  redis.call('PUBLISH', 'market.' .. kind .. suffix, body)
  if maxlen > 0 then
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', maxlen, '*', 'type', kind, 'record', body)
  end
  if high[field] == nil then
    local stored = redis.call('HGET', KEYS[2], field)
    local sh, sl = nil, nil
    if stored then
      sh, sl = string.match(stored, '^(%d+):(%d+)$')
    end
    high[field], low[field] = tonumber(sh) or -1, tonumber(sl) or -1
  end
  if h > high[field] or (h == high[field] and l >= low[field]) then
    high[field], low[field] = h, l
    payload[field] = body
    rank[field] = entry[2] .. ':' .. entry[3]
  end
end
local changed = 0
for field, body in pairs(payload) do
  redis.call('HSET', KEYS[1], field, body)
  redis.call('HSET', KEYS[2], field, rank[field])
  changed = changed + 1
end
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
  if maxlen > 0 then redis.call('EXPIRE', KEYS[3], ttl) end
end
return changed
"""
