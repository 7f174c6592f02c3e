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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import msgspec
from aiohttp import web

from simulator import binance_format
from simulator.binance import BinanceSpot
from simulator.market import Market

log = logging.getLogger(__name__)

DEFAULT_SYMBOLS = ("BTC/USDT", "ETH/USDT", "BNB/USDT")


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
        app = web.Application()
        self.binance.add_routes(app)
        app.router.add_get("/_sim/stats", self._stats)
        app.router.add_post("/_sim/pause", self._pause)
        app.router.add_post("/_sim/resume", self._resume)
        app.router.add_get("/_sim/trades", self._trades)
        app.router.add_post("/_sim/disconnect", self._disconnect)
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
            await self.binance.close_all()
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
                tick = self.market.tick(max_elapsed=max_elapsed)
                self.binance.publish(tick, time.monotonic())
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
            "dialects": {self.binance.name: binance},
        }

    # -- control endpoints ------------------------------------------------------------------------

    async def _stats(self, request: web.Request) -> web.Response:
        return _json(self.stats())

    async def _pause(self, request: web.Request) -> web.Response:
        self.market.pause()
        return _json({"paused": True, "tradesGenerated": self.market.trades_generated()})

    async def _resume(self, request: web.Request) -> web.Response:
        self.market.resume()
        return _json({"paused": False})

    async def _disconnect(self, request: web.Request) -> web.Response:
        return _json({"disconnected": self.binance.disconnect_all()})

    async def _trades(self, request: web.Request) -> web.Response:
        wanted = request.query.get("symbol", "")
        instrument = next(
            (i for i in self.market.instruments.values()
             if wanted in (i.symbol, binance_format.exchange_symbol(i))),
            None,
        )
        if instrument is None:
            return _json({"code": -1121, "msg": "Invalid symbol."}, status=400)
        history = self.market.history(instrument.symbol)
        start = history.begin
        if "fromId" in request.query:
            start = max(start, history.index_of_id(int(request.query["fromId"])))
        stop = history.end
        if "limit" in request.query:
            stop = min(stop, start + int(request.query["limit"]))
        trades = history.slice(start, stop)
        return _json([binance_format.rest_trade(instrument, trade) for trade in trades])


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(body), status=status, content_type="application/json")
