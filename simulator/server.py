"""The simulator process: one aiohttp application serving every dialect plus test controls.

One generator task ticks the market every `tick_interval` seconds and hands the new trades to each
dialect, which fans them out to its subscribers. Everything (WebSocket, REST, `/_sim/` controls)
shares one port.

Control endpoints, for tests and demos:
    GET  /_sim/stats                   connections, subscriptions, frames sent, trades, violations
    POST /_sim/pause, /_sim/resume     stop / restart trade generation (paused time makes no trades)
    GET  /_sim/trades?symbol=BTCUSDT   the ground-truth trade list, in Binance REST `trades` shape
                                       (optional fromId and limit; symbol may also be BTC/USDT)
    POST /_sim/disconnect              drop every WebSocket connection without a close frame
    POST /_sim/inject                  send raw bytes as one frame on every open connection, or on
                                       those subscribed to a stream: {"data": base64, "binary": false,
                                       "stream": "btcusdt@trade"} (hostile-input tests)
    POST /_sim/faults/...              faults of one dialect (simulator/faults.py): drop, stall, skip,
                                       invent, refuse, shutdown, rest, throttle-then-refuse, limits, clear
    GET  /_sim/faults, /_sim/faults/skipped, /_sim/invented
                                       fault state, the trades skipped, the trades invented
    GET  /_sim/book?symbol=BTCUSDT     the ground-truth order book, now or as of a recent update id
    POST /_sim/books                   (or of many ids at once);
                                       depth faults (skipped diffs, stale snapshots): simulator/book.py

Every dialect other than Binance spot runs its own market (its own symbols and trade tape) on the
same port: Binance USD-M futures under `/public`, `/market` and `/fapi/v1` (its real paths), Upbit and
Bithumb under `/upbit/...` and `/bithumb/...`. `?exchange=<name>` selects a dialect in `/_sim/stats`,
`/_sim/trades` (then in the dialect's own REST trade shape, `symbol` in its own spelling or BASE/QUOTE),
`/_sim/pause` (its `tradesGenerated`), `/_sim/disconnect` and every fault endpoint; without it they mean
Binance spot, except pause and resume, which always apply to every market. The ground truth holds only
trades the market made: never the ones the `invent` fault sends.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import msgspec
from aiohttp import web

from simulator import binance_format, book, faults
from simulator.binance import BinanceSpot
from simulator.binance_futures import BinanceFutures
from simulator.market import Market
from simulator.upbit import Bithumb, Upbit

log = logging.getLogger(__name__)

DEFAULT_SYMBOLS = ("BTC/USDT", "ETH/USDT", "BNB/USDT")


def default_venue_symbols(symbols: list[str]) -> dict[str, list[str]]:
    """Futures trade the spot symbols; the Korean exchanges the same bases against KRW."""
    krw = list(dict.fromkeys(f"{symbol.partition('/')[0]}/KRW" for symbol in symbols))
    return {"binance-futures": list(symbols), "upbit": krw, "bithumb": krw}


MAX_CONTROL_BODY = 64 * 1024 * 1024


@dataclass
class SimulatorConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0 picks a free port; Simulator.start() returns the one bound
    symbols: list[str] = field(default_factory=lambda: list(DEFAULT_SYMBOLS))
    trades_per_second: float = 10.0  # per symbol
    seed: int = 1
    ping_interval: float = 20.0
    pong_timeout: float = 60.0
    tick_interval: float = 0.01  # how often the market generates and frames go out
    history_limit: int | None = None  # trades kept per symbol; None keeps them all
    rest_weight_limit: int = binance_format.WEIGHT_LIMIT_PER_MINUTE
    # Symbols of the other dialects' markets (by dialect name); default_venue_symbols() when None.
    venue_symbols: dict[str, list[str]] | None = None


class Simulator:
    """Start with `await start()` (or `async with`), stop with `await stop()`; both are idempotent."""

    def __init__(self, config: SimulatorConfig | None = None, *, clock: Any = time.time) -> None:
        self.config = config or SimulatorConfig()
        self.market = Market(
            self.config.symbols,
            seed=self.config.seed,
            trades_per_second=self.config.trades_per_second,
            clock=clock,
            history_limit=self.config.history_limit,
        )
        self.binance = BinanceSpot(
            self.market,
            ping_interval=self.config.ping_interval,
            pong_timeout=self.config.pong_timeout,
            weight_limit=self.config.rest_weight_limit,
        )
        venues = self.config.venue_symbols or default_venue_symbols(self.config.symbols)

        def market(name: str) -> Market:
            settings = self.config
            return Market(venues[name], seed=settings.seed, trades_per_second=settings.trades_per_second,
                          clock=clock, history_limit=settings.history_limit)  # fmt: skip

        self.venues: dict[str, Any] = {
            self.binance.name: self.binance,
            "binance-futures": BinanceFutures(market("binance-futures")),
            "upbit": Upbit(market("upbit")),
            "bithumb": Bithumb(market("bithumb")),
        }
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self._generator: asyncio.Task[None] | None = None
        self._stopped = False

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.config.host}:{self.port}"

    async def start(self) -> int:
        if self._runner is not None:
            assert self.port is not None
            return self.port
        if self._stopped:
            raise RuntimeError("a stopped simulator cannot be restarted")
        app = web.Application(client_max_size=MAX_CONTROL_BODY)  # room for injected multi-MB frames
        for venue in self.venues.values():
            venue.add_routes(app)
        app.router.add_get("/_sim/stats", self._stats)
        app.router.add_post("/_sim/pause", self._pause)
        app.router.add_post("/_sim/resume", self._resume)
        app.router.add_get("/_sim/trades", self._trades)
        app.router.add_post("/_sim/disconnect", self._disconnect)
        app.router.add_post("/_sim/inject", self._inject)
        faults.add_routes(app, self.venues, default=self.binance.name)
        book.add_routes(app, self.venues, self.binance.name)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        self._generator = asyncio.create_task(self._generate(), name="simulator-generator")
        log.info("simulator listening on %s", self.url)
        return self.port

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._generator is not None:
            self._generator.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._generator
        if self._runner is not None:
            for venue in self.venues.values():
                await venue.close_all()
            await self._runner.cleanup()

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _generate(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.tick_interval
        # An overloaded simulator runs a slower market rather than ever larger catch-up ticks.
        max_elapsed = max(0.25, 5 * interval)
        next_at = loop.time()
        while True:
            try:
                for venue in self.venues.values():
                    # Another venue's market runs only once a client has used it: a benchmark of
                    # Binance spot should not pay for three markets nobody reads.
                    if venue is self.binance or venue.connections_total or venue.rest_requests:
                        venue.publish(venue.market.tick(max_elapsed=max_elapsed), time.monotonic())
            except Exception:
                # One bad tick must not silence the market for the rest of a test run.
                log.exception("simulator tick failed")
            next_at += interval
            delay = next_at - loop.time()
            if delay < 0:  # fell behind: carry on from now instead of bursting to catch up
                next_at = loop.time()
                delay = 0
            await asyncio.sleep(delay)

    def stats(self) -> dict[str, Any]:
        binance = self.binance.stats()
        return {
            "paused": self.market.paused,
            "tradesGenerated": self.market.trades_generated(),
            **binance,
            "dialects": {self.binance.name: binance}
            | {name: self._venue_stats(name) for name in self.venues if name != self.binance.name},
        }

    def _venue_stats(self, name: str) -> dict[str, Any]:
        venue = self.venues[name]
        return {"paused": venue.market.paused, "tradesGenerated": venue.market.trades_generated(),
                **venue.stats()}  # fmt: skip

    def _venue(self, request: web.Request) -> Any:
        """The dialect named by `?exchange=` (Binance spot without one); None for an unknown name."""
        return self.venues.get(request.query.get("exchange", self.binance.name))

    # -- control endpoints ------------------------------------------------------------------------

    async def _stats(self, request: web.Request) -> web.Response:
        if "exchange" in request.query:
            if self._venue(request) is None:
                return _json({"error": "unknown exchange"}, status=404)
            return _json(self._venue_stats(request.query["exchange"]))
        return _json(self.stats())

    async def _pause(self, request: web.Request) -> web.Response:
        venue = self._venue(request)
        if venue is None:
            return _json({"error": "unknown exchange"}, status=404)
        for each in self.venues.values():
            each.market.pause()
        return _json({"paused": True, "tradesGenerated": venue.market.trades_generated()})

    async def _resume(self, request: web.Request) -> web.Response:
        for venue in self.venues.values():
            venue.market.resume()
        return _json({"paused": False})

    async def _disconnect(self, request: web.Request) -> web.Response:
        venue = self._venue(request)
        if venue is None:
            return _json({"error": "unknown exchange"}, status=404)
        return _json({"disconnected": venue.disconnect_all()})

    async def _inject(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            payload = base64.b64decode(body["data"], validate=True)
            binary, stream = body.get("binary", False), body.get("stream")
            if not isinstance(binary, bool) or not (stream is None or isinstance(stream, str)):
                raise TypeError("binary must be a boolean and stream a string")
        except (ValueError, KeyError, TypeError, binascii.Error) as error:
            return _json({"error": f"expected {{data: base64, binary?, stream?}}: {error!r}"}, status=400)
        return _json({"sent": self.binance.inject(payload, binary=binary, stream=stream)})

    async def _trades(self, request: web.Request) -> web.Response:
        venue = self._venue(request)
        if venue is None:
            return _json({"error": "unknown exchange"}, status=404)
        if venue is not self.binance:
            return _venue_trades(venue, request)
        wanted = request.query.get("symbol", "")
        instrument = next(
            (
                i
                for i in self.market.instruments.values()
                if wanted in (i.symbol, binance_format.exchange_symbol(i))
            ),
            None,
        )
        if instrument is None:
            return _json({"code": -1121, "msg": "Invalid symbol."}, status=400)
        try:
            from_id = int(request.query["fromId"]) if "fromId" in request.query else None
            limit = int(request.query["limit"]) if "limit" in request.query else None
        except ValueError:
            return _json({"code": -1100, "msg": "fromId and limit must be integers."}, status=400)
        history = self.market.history(instrument.symbol)
        start = history.begin if from_id is None else max(history.begin, history.index_of_id(from_id))
        stop = history.end if limit is None else min(history.end, start + limit)
        trades = history.slice(start, stop)
        return _json([binance_format.rest_trade(instrument, trade) for trade in trades])


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(body), status=status, content_type="application/json")


def _venue_trades(venue: Any, request: web.Request) -> web.Response:
    """Ground truth of another dialect's market, each trade in that dialect's REST shape."""
    wanted = request.query.get("symbol", "")
    instrument = venue.find_instrument(wanted)
    if instrument is None:
        return _json({"error": f"unknown symbol {wanted!r}"}, status=400)
    try:
        from_id = int(request.query["fromId"]) if "fromId" in request.query else None
        limit = int(request.query["limit"]) if "limit" in request.query else None
    except ValueError:
        return _json({"error": "fromId and limit must be integers"}, status=400)
    history = venue.market.history(instrument.symbol)
    start = history.begin if from_id is None else max(history.begin, history.index_of_id(from_id))
    stop = history.end if limit is None else min(history.end, start + limit)
    return _json([venue.truth_row(instrument, trade) for trade in history.slice(start, stop)])
