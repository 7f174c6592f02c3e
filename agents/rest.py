"""REST requests to an exchange within its real limits, shared by all of a worker's groups.

Every request first waits until it fits:
- the weight budget (`streams.limits.WeightBudget`, half the published limit), with the exchange's
  own count (`X-MBX-USED-WEIGHT-1M` on Binance) believed when higher;
- where the exchange limits requests per second per endpoint group (Upbit 10/s, Bithumb 150/s), that
  group's rate (`streams.limits.RequestRate`), with `Remaining-Req` read where the exchange sends it.

A 429 or 418 with `Retry-After` blocks every request until it has passed (Binance bans the IP, so we
back off before a ban, never probe for one). A 429 without it (Upbit, Bithumb: the limit is per
second) blocks only the group, briefly. Each call makes one attempt and says how it went: retrying is
the caller's decision (the continuity engine's, for history).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import aiohttp

from agents import metrics
from agents.connection import wait_until_allowed
from streams.exchanges.base import ExchangeAdapter
from streams.limits import RequestRate, WeightBudget
from streams.rest import RestRequest

log = logging.getLogger(__name__)

OnThrottled = Callable[[int, float], Awaitable[None]]  # (HTTP status, seconds every request waits)


class RestAnswer(NamedTuple):
    """One attempt's outcome: the body on success; else the status (0: no answer) and how long the
    exchange asked us to wait (0 when it did not say)."""

    body: bytes | None
    status: int = 200
    retry_after: float = 0.0
    error: str = ""


class RestClient:
    def __init__(
        self, adapter: ExchangeAdapter, base_url: str, on_throttled: OnThrottled | None = None
    ) -> None:
        self.adapter = adapter
        self.base_url = base_url
        limits = adapter.limits
        self.budget = WeightBudget(limits.rest_weight_per_minute)
        self.rate = RequestRate(limits.rest_requests_per_second) if limits.rest_requests_per_second else None
        self._on_throttled = on_throttled
        self._session: aiohttp.ClientSession | None = None
        self._lock = asyncio.Lock()  # one request at a time per exchange: bursts are what gets IPs banned
        self.requests = 0
        self.throttled = 0

    def _delay(self, request: RestRequest, group: str) -> float:
        now = time.monotonic()
        delay = self.budget.delay(now, request.weight)
        if self.rate is not None:
            delay = max(delay, self.rate.delay(now, group))
        return delay

    async def fetch(self, request: RestRequest) -> bytes | None:
        """The response body, or None when the request failed or was throttled."""
        return (await self.attempt(request)).body

    async def attempt(self, request: RestRequest) -> RestAnswer:
        """One request, sent when the limits allow it."""
        group = self.adapter.rest_group(request)
        async with self._lock:
            await wait_until_allowed(lambda: self._delay(request, group))
            now = time.monotonic()
            self.budget.spend(now, request.weight)
            if self.rate is not None:
                self.rate.record(now, group)
            self.requests += 1
            try:
                return await self._get(request, group)
            except (TimeoutError, aiohttp.ClientError) as exc:
                log.warning("%s REST %s failed: %r", self.adapter.name, request.tag, exc)
                return RestAnswer(None, 0, 0.0, repr(exc))

    async def _get(self, request: RestRequest, group: str) -> RestAnswer:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
        async with self._session.get(self.base_url + request.path, params=request.params) as response:
            body = await response.read()
            now = time.monotonic()
            headers = response.headers
            used = self.adapter.rest_weight_used(headers)
            if used is not None:
                self.budget.reported(now, used)
            remaining = self.adapter.rest_remaining(headers)
            if remaining is not None and self.rate is not None:
                self.rate.remaining(now, group, remaining)
            metrics.rest_weight_reported(self.adapter.name, headers)
            if response.status in (429, 418):
                return await self._throttled(response.status, headers, group, now)
            if response.status != 200:
                log.warning(
                    "%s REST %s answered %d: %s", self.adapter.name, request.tag, response.status, body[:200]
                )
                return RestAnswer(None, response.status, 0.0, f"HTTP {response.status}")
            if self.rate is not None:
                self.rate.answered(group)
            return RestAnswer(body)

    async def _throttled(self, status: int, headers: Any, group: str, now: float) -> RestAnswer:
        self.throttled += 1
        retry_after = _retry_after(headers)
        if retry_after is not None:
            self.budget.block(now, retry_after)
            wait, scope = retry_after, "no requests"
        elif self.rate is not None:
            wait, scope = self.rate.throttled(now, group), f"no {group} requests"
        else:
            wait = 1.0
            self.budget.block(now, wait)
            scope = "no requests"
        log.warning("%s REST answered %d; %s for %.1f s", self.adapter.name, status, scope, wait)
        if self._on_throttled is not None:
            await self._on_throttled(status, wait)
        return RestAnswer(None, status, wait, f"HTTP {status}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After", "")
    try:
        return max(1.0, float(value))
    except ValueError:
        return None
