"""Faults tests inflict on a dialect, and the limits it enforces like the real exchange.

Every dialect has its own faults: each endpoint takes `?exchange=<name>` (binance, binance-futures,
upbit, bithumb; Binance spot without it; 404 for an unknown name). All triggers are POST with a JSON
body (every field optional) and answer the dialect's fault state plus what they did:

    /_sim/faults/drop                         drop every WebSocket without a close frame
    /_sim/faults/stall  {"seconds": 5, "keepalive": false}
                        connections open now stay open and get nothing for `seconds`. With
                        `keepalive: false` (the default) nothing at all is sent, not even pings or
                        pongs. With `keepalive: true` (stall, then resume) server pings, pongs, Upbit's
                        `{"status":"UP"}` answers and replies to control messages go on, but no data
                        frame is sent: the trades made meanwhile are never sent on those connections,
                        and afterwards frames resume on the same connections with the current ids.
                        Connections opened during the stall get everything.
    /_sim/faults/skip   {"symbol": "BTC/USDT", "count": 5, "seconds": 2}
                        the next `count` trades of the symbol (or those of the next `seconds`, or
                        whichever ends first; every symbol without `symbol`) are sent on no
                        connection, which stays healthy; later trades flow again. Binance ids jump;
                        Upbit's and Bithumb's ids show nothing. The trades are real: the ground truth
                        and REST have them. `GET /_sim/faults/skipped?symbol=` lists them.
    /_sim/faults/invent {"symbol": "BTC/USDT", "ids": "far", "count": 1, "eventType": null}
                        send `count` well-formed trade frames the exchange never made to the symbol's
                        trade streams (Binance spot: trade and aggTrade; futures: aggTrade; Upbit,
                        Bithumb: trade). `ids` is `far` (far outside the sequence, price 1), `lower`
                        (below the newest real id and not a real trade: on Binance a real id with
                        another price and quantity, on Upbit/Bithumb a sequential_id never issued) or
                        `next` (the next id, at the last price). `eventType` replaces the frame's
                        event type (`"megaTrade"`; Upbit's `type`). Invented trades never enter the
                        ground truth; `GET /_sim/invented?symbol=` lists them, in the ground truth's
                        row shape plus `ids`, `eventType`, `sentTo` (connections) and `at` (epoch ms).
    /_sim/faults/refuse {"seconds": 5}        refuse WebSocket handshakes (HTTP 503)
    /_sim/faults/shutdown {"grace": 2}        Binance: send serverShutdown to every connection and close
                                              them after the grace; Upbit and Bithumb announce nothing,
                                              their connections get a 1001 close after the grace
    /_sim/faults/rest   {"status": 429, "seconds": 5, "retryAfter": 3}
                        answer REST with 429/418 in the dialect's shape: Binance with Retry-After
                        (a request before it ran out is a violation, answered 418); Upbit and Bithumb
                        send no Retry-After, as the real ones do not
    /_sim/faults/throttle-then-refuse
                        {"status": 429, "restSeconds": 5, "retryAfter": 5, "dropAfter": 5, "refuseSeconds": 8}
                        REST throttled now for `restSeconds`; `dropAfter` seconds later every connection
                        drops and handshakes get 503 for `refuseSeconds`
    /_sim/faults/limits {"connectAttempts": 300, "window": 300}
                        the per-IP handshake limit (Binance's 300 / 5 min; none on Upbit/Bithumb,
                        which have their own per-second connect limits); on Upbit and Bithumb also
                        {"restPerSecond", "restBanAfter", "restBanSeconds"}
    /_sim/faults/clear                        end every fault now (and lift REST bans)
    GET /_sim/faults                          state, counts and violation counts

Trigger answers carry `startedAt` and, when known, `endsAt` (epoch seconds of the market clock), the
window a fault suite reports on.

Violations are what would get a real client disconnected or banned: handshakes beyond the attempt
limit (refused with 429), and REST requests sent while an earlier 429/418's Retry-After still runs
(answered 418, as Binance bans such clients). Upbit and Bithumb count their own REST limits (see
simulator/limits.py) in the dialect's `violationsByReason`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
from aiohttp import web

from simulator.invented import ID_CHOICES, InventError
from simulator.market import Instrument, Market


class _Dialect(Protocol):
    name: str
    market: Market
    faults: Faults

    def disconnect_all(self) -> int: ...

    def open_connections(self) -> list[Any]: ...

    def send_server_shutdown(self) -> int: ...

    def find_instrument(self, wanted: str) -> Instrument | None: ...

    def truth_row(self, instrument: Instrument, trade: Any) -> dict[str, Any]: ...

    def invent(
        self, instrument: Instrument, ids: str, count: int, event_type: str | None
    ) -> list[dict[str, Any]]: ...

    def configure_limits(self, settings: dict[str, float]) -> None: ...

    def limits_state(self) -> dict[str, Any]: ...

    def clear_bans(self) -> None: ...


@dataclass
class _Skip:
    remaining: int | None  # trades still to skip; None: no count limit
    until: float | None  # monotonic time the skip ends; None: no time limit


class Faults:
    def __init__(
        self, connect_attempts: int | None = 300, window: float = 300.0, *, retry_after_header: bool = True
    ) -> None:
        self.connect_attempts = connect_attempts  # None: no per-IP attempt limit
        self.window = window
        self.retry_after_header = retry_after_header  # whether this exchange's 429s say how long to wait
        self._attempts: dict[str, deque[float]] = {}
        self.refuse_until = 0.0
        self.rest_status = 0
        self.rest_until = 0.0
        self.rest_retry_after = 0
        self._blocked_until: dict[str, float] = {}  # per client: a 429/418's Retry-After
        self._skips: dict[str, _Skip] = {}  # market symbol → the skip running on it
        self.skipped: dict[str, list[int]] = {}  # market symbol → market trade ids never sent
        self.invented: dict[str, list[dict[str, Any]]] = {}  # market symbol → invented rows
        self._stalled: list[tuple[Any, str]] = []  # (connection, flag) of stalls not yet lifted
        self._timers: list[asyncio.TimerHandle] = []
        self.violations = {"connectionAttempts": 0, "restDuringRetryAfter": 0}
        self.counts = {"refusedHandshakes": 0, "restFaultAnswers": 0, "stalls": 0, "shutdowns": 0, "drops": 0,
                       "withheldFrames": 0, "skippedTrades": 0, "inventedTrades": 0}  # fmt: skip

    # -- checks the dialect calls -----------------------------------------------------------------

    def handshake_refusal(self, client: str, now: float) -> int | None:
        """HTTP status to refuse a handshake with, or None to accept it."""
        if self.connect_attempts is not None:
            attempts = self._attempts.setdefault(client, deque())
            while attempts and attempts[0] <= now - self.window:
                attempts.popleft()
            attempts.append(now)
            if len(attempts) > self.connect_attempts:
                self.violations["connectionAttempts"] += 1
                return 429
        if now < self.refuse_until:
            self.counts["refusedHandshakes"] += 1
            return 503
        return None

    def rest_refusal(self, client: str, now: float) -> tuple[int, int] | None:
        """(status, Retry-After seconds) to answer a REST request with, or None to serve it."""
        blocked = self._blocked_until.get(client, 0.0)
        if now < blocked:
            self.violations["restDuringRetryAfter"] += 1
            retry = max(1, int(blocked - now) + 1)
            return 418, retry
        if now < self.rest_until:
            self.counts["restFaultAnswers"] += 1
            if self.retry_after_header:  # a client told to wait must wait; one told nothing cannot
                self._blocked_until[client] = now + self.rest_retry_after
            return self.rest_status, self.rest_retry_after
        return None

    def note_throttled(self, client: str, now: float, retry_after: int) -> None:
        """The dialect answered 429 on its own (weight limit): the client must wait too."""
        self._blocked_until[client] = max(self._blocked_until.get(client, 0.0), now + retry_after)

    @property
    def skipping(self) -> bool:
        return bool(self._skips)

    def skips(self, symbol: str, trade_id: int, now: float) -> bool:
        """Whether a skip withholds this trade from every connection (and counts it if so)."""
        skip = self._skips.get(symbol)
        if skip is None:
            return False
        if skip.until is not None and now >= skip.until:
            del self._skips[symbol]
            return False
        self.skipped.setdefault(symbol, []).append(trade_id)
        self.counts["skippedTrades"] += 1
        if skip.remaining is not None:
            skip.remaining -= 1
            if skip.remaining <= 0:
                del self._skips[symbol]
        return True

    # -- faults tests trigger ---------------------------------------------------------------------

    def stall(self, connections: list[Any], seconds: float, keepalive: bool = False) -> int:
        self.counts["stalls"] += 1
        flag = "data_stalled" if keepalive else "stalled"
        stalled = [(connection, flag) for connection in connections]
        for connection in connections:
            setattr(connection, flag, True)
        self._stalled += stalled
        self._later(seconds, self._unstall, stalled)
        return len(connections)

    def skip(self, symbols: list[str], count: int | None, seconds: float | None, now: float) -> None:
        until = None if seconds is None else now + seconds
        for symbol in symbols:
            self._skips[symbol] = _Skip(count, until)

    def record_invented(self, symbol: str, rows: list[dict[str, Any]]) -> None:
        self.invented.setdefault(symbol, []).extend(rows)
        self.counts["inventedTrades"] += len(rows)

    def throttle_then_refuse(
        self, dialect: _Dialect, status: int, rest_seconds: float, retry_after: int, drop_after: float,
        refuse_seconds: float,
    ) -> None:  # fmt: skip
        self.rest_status, self.rest_retry_after = status, retry_after
        self.rest_until = time.monotonic() + rest_seconds

        def drop_and_refuse() -> None:
            self.refuse_until = time.monotonic() + refuse_seconds  # first, so reconnects are refused
            self.counts["drops"] += 1
            dialect.disconnect_all()

        self._later(drop_after, drop_and_refuse)

    def clear(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        self.refuse_until = self.rest_until = 0.0
        self._blocked_until.clear()
        self._skips.clear()
        self._unstall(self._stalled)

    def _later(self, seconds: float, callback: Callable[..., None], *args: Any) -> None:
        loop = asyncio.get_running_loop()
        self._timers = [timer for timer in self._timers if timer.when() > loop.time()]  # not yet fired
        self._timers.append(loop.call_later(seconds, callback, *args))

    def _unstall(self, stalled: list[tuple[Any, str]]) -> None:
        lifted = {(id(connection), flag) for connection, flag in stalled}
        for connection, flag in stalled:
            if getattr(connection, flag):
                setattr(connection, flag, False)
                if flag == "data_stalled":
                    self.counts["withheldFrames"] += connection.withheld
                    connection.withheld = 0
        self._stalled = [(c, f) for c, f in self._stalled if (id(c), f) not in lifted]

    def state(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "refusing": now < self.refuse_until,
            "rest": {
                "status": self.rest_status,
                "active": now < self.rest_until,
                "retryAfter": self.rest_retry_after,
            },
            "limits": {"connectAttempts": self.connect_attempts, "window": self.window},
            "skipping": {
                symbol: {"remaining": skip.remaining, "secondsLeft": _seconds_left(skip.until, now)}
                for symbol, skip in self._skips.items()
                if skip.until is None or now < skip.until
            },
            "skipped": {symbol: len(ids) for symbol, ids in self.skipped.items()},
            "invented": {symbol: len(rows) for symbol, rows in self.invented.items()},
            "violations": dict(self.violations),
            "counts": dict(self.counts),
        }


# -- HTTP -----------------------------------------------------------------------------------------------


def add_routes(app: web.Application, dialects: Mapping[str, _Dialect], default: str) -> None:
    """The /_sim/faults/ endpoints and /_sim/invented, each for the dialect `?exchange=` names."""

    def dialect_of(request: web.Request) -> _Dialect:
        dialect = dialects.get(request.query.get("exchange", default))
        if dialect is None:
            raise web.HTTPNotFound(text='{"error": "unknown exchange"}', content_type="application/json")
        return dialect

    async def body(request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        try:
            data = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="expected a JSON object") from None
        if not isinstance(data, dict):
            raise web.HTTPBadRequest(text="expected a JSON object")
        return data

    def answer(dialect: _Dialect, **extra: Any) -> web.Response:
        return _json({"exchange": dialect.name, **dialect.faults.state(), **extra})

    def window(dialect: _Dialect, seconds: float | None) -> dict[str, float | None]:
        started = dialect.market.clock()
        return {"startedAt": started, "endsAt": None if seconds is None else started + seconds}

    def instrument_of(dialect: _Dialect, data: Mapping[str, Any], required: bool) -> Instrument | None:
        wanted = data.get("symbol")
        if wanted is None:
            if required:
                raise web.HTTPBadRequest(text="symbol is required")
            return None
        instrument = dialect.find_instrument(wanted) if isinstance(wanted, str) else None
        if instrument is None:
            raise web.HTTPBadRequest(text=f"unknown symbol {wanted!r} on {dialect.name}")
        return instrument

    async def drop(request: web.Request) -> web.Response:
        dialect = dialect_of(request)
        dialect.faults.counts["drops"] += 1
        return answer(dialect, dropped=dialect.disconnect_all(), **window(dialect, 0))

    async def stall(request: web.Request) -> web.Response:
        dialect = dialect_of(request)
        data = await body(request)
        seconds = number(data, "seconds", 5)
        keepalive = flag(data, "keepalive", False)
        stalled = dialect.faults.stall(dialect.open_connections(), seconds, keepalive)
        return answer(dialect, stalled=stalled, keepalive=keepalive, **window(dialect, seconds))

    async def skip(request: web.Request) -> web.Response:
        dialect = dialect_of(request)
        data = await body(request)
        instrument = instrument_of(dialect, data, required=False)
        count = int(number(data, "count", 0)) if "count" in data else None
        seconds = number(data, "seconds", 0) if "seconds" in data else None
        if count is None and seconds is None:
            raise web.HTTPBadRequest(text="give count, seconds or both")
        if count is not None and count < 1:
            raise web.HTTPBadRequest(text="count must be at least 1")
        symbols = [instrument.symbol] if instrument is not None else list(dialect.market.instruments)
        dialect.faults.skip(symbols, count, seconds, time.monotonic())
        return answer(dialect, symbols=symbols, **window(dialect, seconds))

    async def invent(request: web.Request) -> web.Response:
        dialect = dialect_of(request)
        data = await body(request)
        instrument = instrument_of(dialect, data, required=True)
        assert instrument is not None
        ids = data.get("ids", "far")
        if ids not in ID_CHOICES:
            raise web.HTTPBadRequest(text=f"ids must be one of {', '.join(ID_CHOICES)}")
        count = int(number(data, "count", 1))
        if not 1 <= count <= 10_000:
            raise web.HTTPBadRequest(text="count must be between 1 and 10000")
        event_type = data.get("eventType")
        if event_type is not None and (not isinstance(event_type, str) or not event_type):
            raise web.HTTPBadRequest(text="eventType must be a non-empty string")
        try:
            rows = dialect.invent(instrument, ids, count, event_type)
        except InventError as error:
            raise web.HTTPConflict(text=str(error)) from None
        dialect.faults.record_invented(instrument.symbol, rows)
        return answer(dialect, trades=rows, **window(dialect, 0))

    async def refuse(request: web.Request) -> web.Response:
        dialect = dialect_of(request)
        data = await body(request)
        seconds = number(data, "seconds", 5)
        dialect.faults.refuse_until = time.monotonic() + seconds
        return answer(dialect, **window(dialect, seconds))

    async def shutdown(request: web.Request) -> web.Response:
        dialect = dialect_of(request)
        data = await body(request)
        grace = number(data, "grace", 2)
        dialect.faults.counts["shutdowns"] += 1
        connections = dialect.open_connections()
        sent = dialect.send_server_shutdown()
        dialect.faults._later(grace, _close_all, connections)
        return answer(dialect, notified=sent, **window(dialect, grace))

    async def rest(request: web.Request) -> web.Response:
        dialect = dialect_of(request)
        data = await body(request)
        status = rest_status(data)
        seconds = number(data, "seconds", 5)
        faults = dialect.faults
        faults.rest_status = status
        faults.rest_retry_after = max(1, int(number(data, "retryAfter", 3)))
        faults.rest_until = time.monotonic() + seconds
        return answer(dialect, **window(dialect, seconds))

    async def throttle_then_refuse(request: web.Request) -> web.Response:
        dialect = dialect_of(request)
        data = await body(request)
        rest_seconds = number(data, "restSeconds", 5)
        drop_after = number(data, "dropAfter", rest_seconds)
        refuse_seconds = number(data, "refuseSeconds", 8)
        retry_after = max(1, int(number(data, "retryAfter", 5)))
        dialect.faults.throttle_then_refuse(
            dialect, rest_status(data), rest_seconds, retry_after, drop_after, refuse_seconds
        )
        started = dialect.market.clock()
        ends = started + max(rest_seconds, drop_after + refuse_seconds)
        return answer(dialect, dropAt=started + drop_after, startedAt=started, endsAt=ends)

    async def limits(request: web.Request) -> web.Response:
        dialect = dialect_of(request)
        data = await body(request)
        faults = dialect.faults
        if "connectAttempts" in data:
            faults.connect_attempts = max(1, int(number(data, "connectAttempts", 300)))
        faults.window = number(data, "window", faults.window)
        rest_keys = {"restPerSecond", "restBanAfter", "restBanSeconds"}
        rest_settings = {key: number(data, key, 0) for key in rest_keys & data.keys()}
        if rest_settings:
            try:
                dialect.configure_limits(rest_settings)
            except ValueError as error:
                raise web.HTTPBadRequest(text=str(error)) from None
        return answer(dialect, restLimits=dialect.limits_state())

    async def clear(request: web.Request) -> web.Response:
        dialect = dialect_of(request)
        dialect.faults.clear()
        dialect.clear_bans()
        return answer(dialect)

    async def show(request: web.Request) -> web.Response:
        dialect = dialect_of(request)
        return answer(dialect, restLimits=dialect.limits_state())

    async def skipped(request: web.Request) -> web.Response:
        dialect = dialect_of(request)
        return _json(_per_symbol(dialect, request, _skipped_rows))

    async def invented(request: web.Request) -> web.Response:
        dialect = dialect_of(request)
        return _json(_per_symbol(dialect, request, _invented_rows))

    triggers: dict[str, Callable[[web.Request], Any]] = {
        "drop": drop, "stall": stall, "skip": skip, "invent": invent, "refuse": refuse, "shutdown": shutdown,
        "rest": rest, "throttle-then-refuse": throttle_then_refuse, "limits": limits, "clear": clear,
    }  # fmt: skip
    for name, handler in triggers.items():
        app.router.add_post(f"/_sim/faults/{name}", handler)
    app.router.add_get("/_sim/faults", show)
    app.router.add_get("/_sim/faults/skipped", skipped)
    app.router.add_get("/_sim/invented", invented)


def _json(body: Any) -> web.Response:
    # msgspec, not json: Upbit's rows hold prices as raw JSON numbers (msgspec.Raw).
    return web.Response(body=msgspec.json.encode(body), content_type="application/json")


def _per_symbol(
    dialect: _Dialect, request: web.Request, rows: Callable[[_Dialect, Instrument], list[dict[str, Any]]]
) -> Any:
    """One symbol's rows with `?symbol=`, else market symbol → rows for every symbol that has some."""
    wanted = request.query.get("symbol")
    if wanted is not None:
        instrument = dialect.find_instrument(wanted)
        if instrument is None:
            raise web.HTTPBadRequest(text=f"unknown symbol {wanted!r} on {dialect.name}")
        return rows(dialect, instrument)
    every = {symbol: rows(dialect, instrument) for symbol, instrument in dialect.market.instruments.items()}
    return {symbol: found for symbol, found in every.items() if found}


def _invented_rows(dialect: _Dialect, instrument: Instrument) -> list[dict[str, Any]]:
    return dialect.faults.invented.get(instrument.symbol, [])


def _skipped_rows(dialect: _Dialect, instrument: Instrument) -> list[dict[str, Any]]:
    """The skipped trades still in the history, in the ground truth's row shape."""
    history = dialect.market.history(instrument.symbol)
    rows = []
    for trade_id in dialect.faults.skipped.get(instrument.symbol, []):
        index = history.index_of_id(trade_id)
        if history.begin <= index < history.end:
            rows.append(dialect.truth_row(instrument, history.at(index)))
    return rows


def number(data: Mapping[str, Any], key: str, default: float) -> float:
    value = data.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise web.HTTPBadRequest(text=f"{key} must be a non-negative number")
    return float(value)


def flag(data: Mapping[str, Any], key: str, default: bool) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise web.HTTPBadRequest(text=f"{key} must be true or false")
    return value


def rest_status(data: Mapping[str, Any]) -> int:
    status = int(number(data, "status", 429))
    if status not in (429, 418):
        raise web.HTTPBadRequest(text="status must be 429 or 418")
    return status


def _seconds_left(until: float | None, now: float) -> float | None:
    return None if until is None else round(max(0.0, until - now), 3)


def _close_all(connections: list[Any]) -> None:
    for connection in connections:
        connection.close(1001)
