"""REST requests to an exchange within its weight budget, shared by all of a worker's groups.

Every request waits until it fits the budget (`streams.limits.WeightBudget`, half the published
limit), the exchange's own count (`X-MBX-USED-WEIGHT-1M` on Binance) is believed when higher, and a
429 or 418 blocks every request until its `Retry-After` has passed: we back off before a ban, never
probe for one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from agents import metrics
from agents.connection import wait_until_allowed
from streams.exchanges.base import ExchangeAdapter
from streams.limits import WeightBudget
from streams.rest import RestRequest

log = logging.getLogger(__name__)

OnThrottled = Callable[[int, float], Awaitable[None]]  # (HTTP status, retry after seconds)
DEFAULT_RETRY_AFTER = 30.0


class RestClient:
    def __init__(
        self, adapter: ExchangeAdapter, base_url: str, on_throttled: OnThrottled | None = None
    ) -> None:
        self.adapter = adapter
        self.base_url = base_url
        self.budget = WeightBudget(adapter.limits.rest_weight_per_minute)
        self._on_throttled = on_throttled
        self._session: aiohttp.ClientSession | None = None
        self._lock = asyncio.Lock()  # one request at a time per exchange: bursts are what gets IPs banned
        self.requests = 0
        self.throttled = 0

    async def fetch(self, request: RestRequest) -> bytes | None:
        """The response body, or None when the request failed or was throttled (the caller retries later)."""
        async with self._lock:
            await wait_until_allowed(lambda: self.budget.delay(time.monotonic(), request.weight))
            self.budget.spend(time.monotonic(), request.weight)
            self.requests += 1
            try:
                return await self._get(request)
            except (TimeoutError, aiohttp.ClientError) as exc:
                log.warning("%s REST %s failed: %r", self.adapter.name, request.tag, exc)
                return None

    async def _get(self, request: RestRequest) -> bytes | None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
        async with self._session.get(self.base_url + request.path, params=request.params) as response:
            body = await response.read()
            now = time.monotonic()
            used = self.adapter.rest_weight_used(response.headers)
            if used is not None:
                self.budget.reported(now, used)
            metrics.rest_weight_reported(self.adapter.name, response.headers)
            if response.status in (429, 418):
                retry_after = _retry_after(response.headers)
                self.budget.block(now, retry_after)
                self.throttled += 1
                log.warning(
                    "%s REST answered %d; no requests for %.0f s",
                    self.adapter.name,
                    response.status,
                    retry_after,
                )
                if self._on_throttled is not None:
                    await self._on_throttled(response.status, retry_after)
                return None
            if response.status != 200:
                log.warning(
                    "%s REST %s answered %d: %s", self.adapter.name, request.tag, response.status, body[:200]
                )
                return None
            return body

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _retry_after(headers: Any) -> float:
    value = headers.get("Retry-After", "")
    try:
        return max(1.0, float(value))
    except ValueError:
        return DEFAULT_RETRY_AFTER
