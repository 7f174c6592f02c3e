"""Order books end to end, per exchange: a worker keeps the books of the simulator's symbols through
a skipped diff, a stall (then resume), a dropped connection and a stale snapshot, and every depth
record it publishes rebuilds the simulator's ground truth.

One broker, one simulator (every dialect) and one worker collecting `depth` on all four exchanges are
shared by the tests. A consumer rebuilds each book from `market.depth.<exchange>.<symbol>` the way
the README tells consumers to (start at a snapshot, apply the updates in order, check the
`prevUpdateId` chain) and compares it, at every record's `lastUpdateId`, with `/_sim/book` at that
update id: the configured levels of both sides, as exact numbers. After each fault the book must be
synced again and published past the fault. The table (mismatches, crossed books, chain breaks,
resyncs by reason) is printed (`-s`) and recorded as a test property.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agents.embedded_broker import EmbeddedBroker
from simulator.book import HISTORY_SECONDS
from streams.records import Depth, decode_record
from tests.depth_consumer import RebuiltBook, exact
from tests.harness import Simulator, TopicReader, Worker, wait_for

pytestmark = pytest.mark.e2e

SPOT = ["BTC/USDT", "ETH/USDT"]
KRW = ["BTC/KRW", "ETH/KRW"]
ROUTES = {"binance": "", "binance-futures": "", "upbit": "/upbit", "bithumb": "/bithumb"}
LEVELS = {"binance": 20, "binance-futures": 20, "upbit": 15, "bithumb": 15}
RECOVER = 45.0  # seconds a book has to be synced and published past a fault
AGAIN_AFTER = 10.0  # seconds before a fault a resync of another cause took in is inflicted again
TRUTHS_PER_REQUEST = 500  # ids asked of /_sim/books at once


def symbols_of(exchange: str) -> list[str]:
    return KRW if exchange in ("upbit", "bithumb") else SPOT


def sim_symbol(exchange: str, symbol: str) -> str:
    base, quote = symbol.split("/")
    return f"{quote}-{base}" if exchange in ("upbit", "bithumb") else base + quote


class Setup:
    def __init__(self, simulator: Simulator, worker: Worker, broker: EmbeddedBroker) -> None:
        self.simulator = simulator
        self.worker = worker
        self.reader = TopicReader(broker.bootstrap)

    def metric(self, name: str, exchange: str) -> dict[str, float]:
        return metric(self.worker, name, exchange)


def metric(worker: Worker, name: str, exchange: str) -> dict[str, float]:
    """`name{exchange=..., <label>=...} value` samples of a worker, by their other label."""
    _, text = worker.request("/metrics")
    return samples(text, name, exchange)


def samples(text: str, name: str, exchange: str) -> dict[str, float]:
    """The samples `metric` gives, from a `/metrics` text already read."""
    found = {}
    for line in text.splitlines():
        match = re.match(rf'{name}\{{exchange="{re.escape(exchange)}"(?:,\w+="([^"]*)")?\}} (\S+)', line)
        if match:
            found[match.group(1) or ""] = float(match.group(2))
    return found


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("depth")
    with EmbeddedBroker() as broker:
        simulator = Simulator(SPOT, rate=15)
        try:
            exchanges = {
                exchange: {
                    "wsEndpoint": simulator.ws + route,
                    "restEndpoint": simulator.http + route,
                    "symbols": symbols_of(exchange),
                    "dataTypes": ["depth"],
                    "connections": {"max": 4, "streamsPerConnection": 1000},
                }
                for exchange, route in ROUTES.items()
            }
            config = {"exchanges": exchanges, "kafka": {"brokers": "embedded"},
                      "logging": {"level": "info", "format": "json"}}  # fmt: skip
            path = tmp / "depth.yaml"
            path.write_text(yaml.safe_dump(config))
            worker = Worker(path, broker.bootstrap, tmp)
            running = Setup(simulator, worker, broker)
            try:
                worker.wait_ready(90)
                yield running
            finally:
                running.reader.close()
                worker.stop()
            # An exception's traceback, not Faust's dump of its agents when a rebalance waits long.
            assert "Traceback (most recent call last)" not in worker.log(), worker.log()[-4000:]
        finally:
            simulator.stop()


class Books:
    """One exchange's books as a consumer rebuilds them, checked against the simulator's truth."""

    def __init__(self, setup: Setup, exchange: str) -> None:
        self.setup, self.exchange = setup, exchange
        self.levels = LEVELS[exchange]
        self.symbols = symbols_of(exchange)
        self.rebuilt = {symbol: RebuiltBook() for symbol in self.symbols}
        self.read = {symbol: 0 for symbol in self.symbols}
        self.checked = self.mismatches = self.unknown = 0
        self.expired = 0  # records older than the simulator remembers: they cannot be checked
        self.examples: list[str] = []

    def topic(self, symbol: str) -> str:
        return f"market.depth.{self.exchange}.{symbol.replace('/', '-').lower()}"

    def truth(self, symbol: str, update_id: str | None = None) -> Any:
        query = f"exchange={self.exchange}&symbol={sim_symbol(self.exchange, symbol)}&levels={self.levels}"
        if update_id is not None:
            query += f"&updateId={update_id}"
        try:
            return self.setup.simulator.get(f"/_sim/book?{query}", exact_numbers=True)
        except OSError:  # 404: an id the simulator does not remember
            return None

    def now_id(self, symbol: str) -> int:
        return int(self.truth(symbol)["updateId"])

    def truths(self, symbol: str, update_ids: list[str]) -> list[Any]:
        """The truth at each id, asked in one request per chunk (None for an id not remembered)."""
        answers: list[Any] = []
        for start in range(0, len(update_ids), TRUTHS_PER_REQUEST):
            body = {"symbol": sim_symbol(self.exchange, symbol), "levels": self.levels,
                    "updateIds": update_ids[start : start + TRUTHS_PER_REQUEST]}  # fmt: skip
            path = f"/_sim/books?exchange={self.exchange}"
            answers += self.setup.simulator.post(path, body, exact_numbers=True)["books"]
        return answers

    def catch_up(self) -> None:
        """Read the new records, rebuild (a broken chain raises), compare each with the truth."""
        reader = self.setup.reader
        reader.follow(f"market.depth.{self.exchange}.")
        reader.poll(0.3)
        for symbol in self.symbols:
            messages = reader.records.get(self.topic(symbol), [])
            # (update id, the rebuilt top there) of each record the simulator should still remember
            rebuilt: list[tuple[str, Any]] = []
            for message in messages[self.read[symbol] :]:
                record = decode_record(message.value())
                data = record.data
                assert isinstance(data, Depth)
                book = self.rebuilt[symbol]
                book.apply(record)
                # Under load the module reaches an exchange's records late, past the simulator's
                # memory: those cannot be checked. Only an id it should still remember is unknown.
                horizon_ms = time.time() * 1000 - (HISTORY_SECONDS - 5) * 1000
                if record.received_at < horizon_ms:
                    self.expired += 1
                    continue
                rebuilt.append((str(data.last_update_id), book.top(self.levels)))
            self.read[symbol] = len(messages)
            truths = self.truths(symbol, [update_id for update_id, _ in rebuilt])
            for (update_id, top), truth in zip(rebuilt, truths, strict=True):
                if truth is None:
                    self.unknown += 1
                    continue
                self.checked += 1
                expected = (exact(truth["bids"]), exact(truth["asks"]))
                if top != expected:
                    self.mismatches += 1
                    if len(self.examples) < 3:
                        self.examples.append(
                            f"{symbol} at {update_id}: {top[0][:3]}, {top[1][:3]} != {expected}"
                        )

    def last_id(self, symbol: str) -> int:
        last = self.rebuilt[symbol].last_id
        return -1 if last is None else int(last)

    def synced(self) -> bool:
        for symbol in self.symbols:
            status, view = self.setup.worker.request(f"/books/{self.exchange}/{symbol.replace('/', '-')}")
            if status != 200 or view["state"] != "synced":
                return False
        return True

    def past(self, ids: dict[str, int]) -> bool:
        self.catch_up()
        return self.synced() and all(self.last_id(s) >= ids[s] for s in self.symbols)

    def crossed(self) -> int:
        return sum(book.crossed for book in self.rebuilt.values())


def pipeline(worker: Worker, exchange: str) -> dict[str, Any]:
    """Where a worker's pipeline for an exchange stands: frames received, records normalized and
    acknowledged, and each book's state and ids as its owner serves it (a failure tells which stage
    stopped)."""
    try:
        _, text = worker.request("/metrics")
        counts = {
            stage: sum(samples(text, f"collector_messages_{stage}_total", exchange).values())
            for stage in ("received", "processed", "sent")
        }
        books = {}
        for symbol in symbols_of(exchange):
            status, view = worker.request(f"/books/{exchange}/{symbol.replace('/', '-')}?levels=1")
            books[symbol] = (
                [view[k] for k in ("state", "updateId", "lastRecordId", "syncReason", "servedBy")]
                if status == 200 else status
            )  # fmt: skip
    except OSError as exc:  # a worker that does not answer is itself the finding
        return {"error": repr(exc), "at": time.strftime("%H:%M:%S")}
    return {**counts, "books": books, "at": time.strftime("%H:%M:%S")}


def fault_table(rows: list[dict[str, Any]]) -> str:
    columns = ["fault", "records", "checked", "mismatches", "unknownIds", "crossed", "resyncs", "seconds"]
    lines = [" | ".join(columns)]
    for row in rows:
        lines.append(" | ".join(str(row[c]) for c in columns))
    return "\n".join(lines)


@pytest.mark.parametrize("exchange", ["binance", "binance-futures", "upbit", "bithumb"])
def test_books_match_the_ground_truth_after_every_fault(
    setup: Setup, exchange: str, record_property: Callable[[str, object], None]
) -> None:
    books = Books(setup, exchange)
    simulator = setup.simulator
    wait_for(books.synced, RECOVER, f"{exchange} books synced")

    # The views: the coins say synced, the collector counts the books.
    def coin_books() -> dict[str, str | None]:
        coins = setup.worker.request(f"/coins?exchange={exchange}")[1]["coins"]
        return {coin["symbol"]: coin.get("book") for coin in coins}

    def collector_books() -> dict[str, int]:
        collectors = setup.worker.request("/collectors")[1]["collectors"]
        return next(c for c in collectors if c["exchange"] == exchange)["books"]

    wait_for(
        lambda: coin_books() == dict.fromkeys(books.symbols, "synced"), RECOVER, f"{exchange} coins synced"
    )
    wait_for(lambda: collector_books() == {"synced": 2, "syncing": 0}, RECOVER, f"{exchange} books counted")
    status, view = setup.worker.request(f"/books/{exchange}/{books.symbols[0].replace('/', '-')}?levels=5")
    assert status == 200 and len(view["bids"]) == 5 and view["servedBy"]

    diff_books = exchange in ("binance", "binance-futures")

    def connections() -> set[str]:
        subscriptions = simulator.get(f"/_sim/stats?exchange={exchange}")["subscriptions"]
        return {cid for cid, streams in subscriptions.items() if streams}

    def fault(
        name: str, trigger: Callable[[], Any], reconnects: bool = False, resyncs_for: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """Trigger a fault, wait until it took effect (its end, the reconnect, the resync it causes
        on diff books), then until the books are synced and published past it; one table row."""
        before = setup.metric("collector_book_resyncs_total", exchange)
        checked, mismatches, unknown = books.checked, books.mismatches, books.unknown
        records = sum(books.read.values())
        old = connections()
        started = time.monotonic()
        answer = trigger()
        ends_at = answer.get("endsAt") if isinstance(answer, dict) else None
        if ends_at is not None:
            wait_for(lambda: time.time() > ends_at, 30, f"the end of {name}")
        if reconnects:
            wait_for(lambda: (now := connections()) and not now & old, RECOVER, f"{exchange} reconnected")

        def resynced() -> dict[str, int]:
            after = setup.metric("collector_book_resyncs_total", exchange)
            return {r: int(n - before.get(r, 0)) for r, n in after.items() if n > before.get(r, 0)}

        try:
            if diff_books and resyncs_for:
                wanted, inflicted = set(resyncs_for), time.monotonic()

                def took_effect() -> bool:
                    nonlocal inflicted
                    counted = resynced()
                    if counted.keys() & wanted:
                        return True
                    # A book resyncing already when the fault lands (it ran short of known levels,
                    # say) takes the fault in with the snapshot it waits for, and counts no resync
                    # for it: only then is the fault inflicted again.
                    if counted and time.monotonic() - inflicted > AGAIN_AFTER:
                        trigger()
                        inflicted = time.monotonic()
                    return False

                wait_for(took_effect, RECOVER, f"{exchange} resync after {name}")
            ids = {symbol: books.now_id(symbol) for symbol in books.symbols}
            wait_for(lambda: books.past(ids), RECOVER, f"{exchange} books published past {name}")
        except TimeoutError as exc:  # what the worker did meanwhile (its log follows in the report)
            seen = {"fault": answer, "resyncs": resynced(), "connections": (old, connections()),
                    "coins": coin_books(), "records read": sum(books.read.values()) - records}  # fmt: skip
            raise TimeoutError(f"{exc}; {seen}") from None
        seconds = round(time.monotonic() - started, 1)
        books.catch_up()
        return {
            "fault": name, "records": sum(books.read.values()) - records, "checked": books.checked - checked,
            "mismatches": books.mismatches - mismatches, "unknownIds": books.unknown - unknown,
            "crossed": books.crossed(), "resyncs": resynced(), "seconds": seconds,
        }  # fmt: skip

    def post(fault: str, body: dict[str, Any] | None = None) -> Callable[[], Any]:
        return lambda: simulator.post(f"/_sim/faults/{fault}?exchange={exchange}", body)

    def stale_then_drop() -> None:
        post("stale-snapshot", {"count": 2, "seconds": 2})()
        post("drop")()

    first = sim_symbol(exchange, books.symbols[0])
    # After a stall the diffs jump (the same connection resumes), or the worker has replaced the
    # stalled connection already (it watches each connection's pace): either resyncs.
    skip, stall = (
        post("depth-skip", {"symbol": first, "count": 1}),
        post("stall", {"seconds": 3, "keepalive": True}),
    )
    rows = [
        fault("none (first sync)", lambda: None),
        fault("skipped diff", skip, resyncs_for=("sequence-break",)),
        fault("stall 3 s, then resume", stall, resyncs_for=("sequence-break", "new-connection")),
        fault("drop", post("drop"), reconnects=True, resyncs_for=("new-connection",)),
        fault(
            "stale snapshot, then a drop", stale_then_drop, reconnects=True, resyncs_for=("stale-snapshot",)
        ),
    ]
    post("clear")()
    table = fault_table(rows)
    print(f"\n{exchange}\n{table}")
    record_property("fault_table", json.dumps(rows))
    assert sum(row["mismatches"] for row in rows) == 0, books.examples
    assert books.crossed() == 0
    assert setup.metric("collector_books_crossed_total", exchange) in ({}, {"": 0.0})
    assert books.checked > 0 and books.unknown <= books.checked // 20, (books.checked, books.unknown)
    if diff_books:  # each fault made the books resync for its reason (the waits above saw it)
        assert "new-connection" in rows[4]["resyncs"], rows[4]
    else:
        assert all(not row["resyncs"] for row in rows[1:]), rows  # whole books need no resync


def test_a_second_worker_takes_over_books_which_resync_and_each_is_served_by_its_owner(
    setup: Setup, tmp_path: Path
) -> None:
    """A worker joins: the groups it takes over resync their books there (`rebalance`), the records
    still rebuild the truth across the change of owner, and either worker answers `/books` for any
    symbol, forwarding to the owner."""
    first = setup.worker
    assert first.request("/books/binance/BTC-USDT?levels=0")[0] == 400
    assert first.request("/books/kraken/BTC-USDT")[0] == 404
    assert first.request("/books/binance/BNB-USDT")[0] == 404  # listed, but no depth subscribed
    binance = Books(setup, "binance")
    binance.catch_up()
    second = Worker(first.config_path, first.brokers, tmp_path, name="second")
    try:
        second.wait_ready(90)
        owners: dict[tuple[str, str], str] = {}

        def everyone_answers() -> bool:
            for exchange in ROUTES:
                for symbol in symbols_of(exchange):
                    path = f"/books/{exchange}/{symbol.replace('/', '-')}?levels=3"
                    answers = [worker.request(path) for worker in (first, second)]
                    if any(status != 200 or view["state"] != "synced" for status, view in answers):
                        return False
                    served = {view["servedBy"] for _, view in answers}
                    if len(served) != 1:
                        return False
                    owners[(exchange, symbol)] = served.pop()
            return True

        wait_for(everyone_answers, 90, "both workers answering for every book, from its owner")
        # Every answer came from the book's owner, so the other worker forwarded. The worker that
        # joined synced the books it took over ("start"); the first one started the books it kept
        # over ("rebalance": partitions were revoked).
        assert len(owners) == 8 and all(url.startswith("http") for url in owners.values())
        resyncs = [
            metric(first, "collector_book_resyncs_total", "binance").get("rebalance", 0),
            metric(second, "collector_book_resyncs_total", "binance").get("start", 0),
        ]
        assert sum(resyncs) > 0, resyncs
        binance.catch_up()  # the records of the join, checked before the wait for newer ones starts
        ids = {symbol: binance.now_id(symbol) for symbol in binance.symbols}
        before = {worker.name: pipeline(worker, "binance") for worker in (first, second)}
        try:
            wait_for(lambda: binance.past(ids), RECOVER, "binance books published past the rebalance")
        except TimeoutError as exc:  # how far each book got, who owns it, and which stage stopped
            last = {symbol: binance.last_id(symbol) for symbol in binance.symbols}
            after = {worker.name: pipeline(worker, "binance") for worker in (first, second)}
            raise TimeoutError(
                f"{exc}; wanted {ids}, read up to {last}, owners {owners}; when the wait began {before},"
                f" at its end {after}"
            ) from None
        assert binance.mismatches == 0 and binance.crossed() == 0, binance.examples
    finally:
        second.stop()
    assert "Traceback (most recent call last)" not in second.log(), second.log()[-4000:]
