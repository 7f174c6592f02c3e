"""One adapter per exchange per worker, built from the exchange's instrument list.

The list is loaded in the background from the moment the worker starts. When the exchange cannot be
reached (no internet, a firewall, a blocked region) the worker says at once which URL failed and what
to do, then keeps trying quietly with backoff; everything that needs the adapter waits for it instead
of failing, and stopping the worker cancels the wait at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
from mode import Service

from agents import metrics
from streams.config import ExchangeConfig
from streams.depth import DepthSettings
from streams.events import CollectorEvent
from streams.exchanges import adapter_class
from streams.exchanges.base import ExchangeAdapter, Instrument

log = logging.getLogger(__name__)

EmitEvent = Callable[[CollectorEvent], Awaitable[None]]
FIRST_RETRY = 2.0
MAX_RETRY = 60.0
REMIND_EVERY = 300.0  # seconds between repeated warnings while an exchange stays unreachable
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=10, connect=5)


def depth_settings(adapter_type: type[ExchangeAdapter], settings: ExchangeConfig) -> DepthSettings | None:
    """The exchange's configured `depth` block with its defaults (checked when the config was loaded)."""
    if "depth" not in adapter_type.data_kinds:
        return None
    depth = settings.depth
    return adapter_type.depth_settings(depth.levels, depth.speed, depth.snapshotIntervalSeconds)


class InstrumentsUnavailable(Exception):
    """The instrument list could not be fetched or read; `problem` says why, for the operator."""

    def __init__(self, url: str, problem: str) -> None:
        super().__init__(f"{url}: {problem}")
        self.url = url
        self.problem = problem


async def fetch_instruments(
    adapter_type: type[ExchangeAdapter], rest_endpoint: str, session: aiohttp.ClientSession
) -> list[Instrument]:
    """One attempt at the exchange's market list; InstrumentsUnavailable says what went wrong."""
    url = rest_endpoint + adapter_type.instruments_path
    try:
        async with session.get(url) as response:
            body = await response.read()
            metrics.rest_weight_reported(adapter_type.name, response.headers)
            if response.status != 200:
                raise InstrumentsUnavailable(url, f"HTTP {response.status}")
    except TimeoutError:
        raise InstrumentsUnavailable(url, "no answer within 10 s") from None
    except aiohttp.ClientError as exc:
        raise InstrumentsUnavailable(url, str(exc) or type(exc).__name__) from None
    try:
        return adapter_type.parse_instruments(body)
    except ValueError as exc:  # FrameError: an answer that is no instrument list (a captive portal, a proxy)
        raise InstrumentsUnavailable(url, f"the answer is not an instrument list: {exc}") from None


def unreachable_advice(exchange: str, error: InstrumentsUnavailable, mirrors: tuple[str, ...]) -> str:
    """What the operator reads when an exchange cannot be reached: the URL, the cause, what to do."""
    mirror = f" (for example {', '.join(mirrors)})" if mirrors else ""
    return (
        f"{exchange}: cannot load the instrument list from {error.url}: {error.problem}. "
        f"Check this machine's internet access, or point exchanges.{exchange}.restEndpoint and "
        f"wsEndpoint at a reachable proxy or mirror{mirror}; without exchange access, `make demo` "
        f"runs the collector against the local simulator. Retrying in the background."
    )


class AdapterDirectory(Service):
    """Loads each configured exchange's adapter in the background; `get` waits until it is there."""

    def __init__(
        self, exchanges: Mapping[str, ExchangeConfig], emit_event: EmitEvent | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.exchanges = exchanges
        self._emit_event = emit_event
        self._loaded: dict[str, asyncio.Future[ExchangeAdapter]] = {}

    def _future(self, exchange: str) -> asyncio.Future[ExchangeAdapter]:
        if exchange not in self._loaded:
            self._loaded[exchange] = asyncio.get_running_loop().create_future()
        return self._loaded[exchange]

    async def get(self, exchange: str) -> ExchangeAdapter:
        """The exchange's adapter, once its instrument list has been loaded (KeyError: not configured)."""
        if exchange not in self.exchanges:
            raise KeyError(exchange)
        return await asyncio.shield(self._future(exchange))

    def loaded(self, exchange: str) -> ExchangeAdapter | None:
        future = self._loaded.get(exchange)
        return future.result() if future is not None and future.done() else None

    async def on_start(self) -> None:
        for exchange in self.exchanges:
            self._future(exchange)
            self.add_future(self._load(exchange))

    async def _load(self, exchange: str) -> None:
        settings = self.exchanges[exchange]
        adapter_type = adapter_class(exchange)
        delay = FIRST_RETRY
        attempts = 0
        warned_at: float | None = None
        async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
            while True:
                attempts += 1
                try:
                    listed = await fetch_instruments(adapter_type, settings.restEndpoint, session)
                    break
                except InstrumentsUnavailable as exc:
                    now = time.monotonic()
                    if warned_at is None or now - warned_at >= REMIND_EVERY:
                        log.warning(unreachable_advice(exchange, exc, adapter_type.public_mirrors))
                        warned_at = now
                    else:
                        log.debug("%s: instrument list attempt %d failed: %s", exchange, attempts, exc)
                await asyncio.sleep(delay * (0.75 + random.random() / 2))
                delay = min(delay * 2, MAX_RETRY)
        if warned_at is not None:
            log.info("%s: instrument list loaded after %d attempts", exchange, attempts)
        await self._report_missing(exchange, settings, listed)
        # Every listed market, not only the configured ones: symbols can be subscribed at runtime.
        self._future(exchange).set_result(adapter_type(listed, depth_settings(adapter_type, settings)))

    async def _report_missing(
        self, exchange: str, settings: ExchangeConfig, listed: list[Instrument]
    ) -> None:
        missing = set(settings.symbols) - {i.symbol for i in listed}
        if not missing:
            return
        log.error("%s does not list %s; they are skipped", exchange, ", ".join(sorted(missing)))
        if self._emit_event is None:
            return
        event = CollectorEvent(
            type="unknown-symbols",
            exchange=exchange,
            time=metrics.now_ms(),
            detail={"symbols": sorted(missing)},
        )
        try:
            await self._emit_event(event)
        except Exception:  # events are best effort; the adapter must still become available
            log.exception("could not emit the unknown-symbols event")
