"""`python -m bench` (what `make bench` runs): a rate ladder over 100 and 1,000 symbols with one
worker, then two workers, then the order book steps (bench/depth.py), printed and written to
docs/benchmarks.md.

Every step starts a fresh embedded broker, simulator and worker(s), so steps do not share state.
The simulator, the broker and this reader run on the same machine and compete for its cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench.depth import BooksResult, DepthLoadResult, depth_lines, run_books, run_depth_load
from bench.distribution import DistributionResult, distribution_table, run_distribution_step
from bench.procfs import machine
from bench.profile import summarize
from bench.report import machine_line, slice_table, summary, table, write_results
from bench.step import StepResult, run_step

REPO = Path(__file__).resolve().parents[1]


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--symbols", default="100,1000", help="symbol counts to run the ladder for")
    parser.add_argument(
        "--rates",
        default="5000,10000,20000,30000,40000,50000,60000,70000,80000,100000",
        help="events/s ladder; each symbol count climbs it until a rate is not carried",
    )
    parser.add_argument(
        "--bbo-from",
        type=int,
        default=1000,
        help="symbol counts from this one up subscribe bbo beside trades (half the events each)",
    )
    parser.add_argument(
        "--two-workers-rate", type=int, default=10000, help="two workers, fewest symbols; 0 skips it"
    )
    parser.add_argument("--quiet-rate", type=int, default=500, help="quiet step: events/s; 0 skips it")
    parser.add_argument("--quiet-symbols", type=int, default=20, help="quiet step: symbols")
    parser.add_argument(
        "--idle-rate", type=int, default=20,
        help="idle step, the quiet step's symbols at this many events/s (what timers and polls cost "
        "with next to no traffic); 0 skips it",
    )  # fmt: skip
    parser.add_argument("--warmup", type=float, default=4.0)
    parser.add_argument("--duration", type=float, default=12.0, help="seconds measured per step")
    parser.add_argument("--profile", default="", help="directory for py-spy profiles of every step")
    parser.add_argument("--output", default=str(REPO / "docs" / "benchmarks.md"), help="'-' prints only")
    parser.add_argument(
        "--soak", type=float, default=0.0,
        help="instead of the ladder: one long step of this many seconds (fewest symbols, --soak-rate), "
        "reported slice by slice; printed only",
    )  # fmt: skip
    parser.add_argument(
        "--separate-broker", action="store_true",
        help="a broker process of its own (the raw topic path of a Kafka cluster) instead of the worker's "
        "embedded one (the default config)",
    )  # fmt: skip
    parser.add_argument("--soak-rate", type=int, default=10000)
    parser.add_argument("--soak-slice", type=float, default=30.0, help="seconds per reported slice")
    parser.add_argument(
        "--distribution-rate", type=int, default=5000,
        help="distribution step: one worker at this rate, fewest symbols, with WebSocket clients; 0 skips",
    )  # fmt: skip
    parser.add_argument(
        "--distribution-clients", type=int, default=200, help="clients filtered to one symbol"
    )
    parser.add_argument("--distribution-full", type=int, default=5, help="clients on the full stream")
    parser.add_argument(
        "--depth-symbols", type=int, default=100, help="depth step: symbols with diffs; 0 skips"
    )
    parser.add_argument(
        "--depth-trade-rate", type=int, default=5000, help="depth step: trades/s beside the diffs"
    )
    parser.add_argument("--books", type=int, default=1000, help="books step: Binance books to sync; 0 skips")
    parser.add_argument("--book-levels", type=int, default=50, help="books step: levels published (100 kept)")
    parser.add_argument("--depth-only", action="store_true", help="only the order book steps; printed only")
    args = parser.parse_args(argv)
    if args.soak > 0:
        return _soak(min(_ints(args.symbols)), args.soak_rate, args.soak, args.soak_slice, args.warmup)
    if args.depth_only:
        print("\n" + _machine_now() + "\n" + _depth(args, []))
        return 0

    results: list[StepResult] = []
    failures: list[str] = []

    def step(
        symbols: int, rate: int, workers: int = 1, warmup: float | None = None, duration: float | None = None
    ) -> StepResult | None:
        bbo = symbols >= args.bbo_from
        kinds = "trade+bbo" if bbo else "trade"
        print(f"bench: {symbols} symbols ({kinds}), {rate:,} events/s, {workers} worker(s) …", flush=True)
        profile = Path(args.profile) / f"worker-{symbols}-{rate}-{workers}.txt" if args.profile else None
        if profile is not None:
            profile.parent.mkdir(parents=True, exist_ok=True)
        try:
            result = run_step(
                symbols, rate, workers, warmup=warmup or args.warmup, duration=duration or args.duration,
                profile_to=profile,
                separate_broker=args.separate_broker, bbo=bbo,
            )  # fmt: skip
        except (TimeoutError, OSError, RuntimeError) as exc:  # e.g. a simulator too busy to answer
            print(f"bench: step failed: {exc!r}", flush=True)
            failures.append(f"{symbols} symbols, {rate:,} events/s, {workers} worker(s): {exc!r}")
            return None
        if profile is not None and profile.exists():
            print(summarize(profile, top=30), flush=True)
        results.append(result)
        print(table([result]).splitlines()[-1], flush=True)
        return result

    for symbols in _ints(args.symbols):
        for rate in _ints(args.rates):
            result = step(symbols, rate)
            if result is None or not result.passed:
                break  # the ladder stops at the first rate the worker cannot carry without loss
    if args.two_workers_rate:
        step(min(_ints(args.symbols)), args.two_workers_rate, workers=2)
    if args.quiet_rate:
        # What a quiet deployment pays all day: measured once the start-up work (subscribing, tables,
        # topic creation) is over, over a longer window than the ladder's.
        step(args.quiet_symbols, args.quiet_rate, warmup=15.0, duration=40.0)
    if args.idle_rate:
        # No busy polling: with next to no traffic, only the timers' and polls' own cost is left.
        step(args.quiet_symbols, args.idle_rate, warmup=15.0, duration=40.0)

    text = _machine_now() + "\n"
    if results:
        text += table(results) + "\n" + summary(results)
    if args.distribution_rate:
        distributed = _distribution_step(args, min(_ints(args.symbols)), failures)
        if distributed is not None:
            text += "\nDistribution (`/ws/exchange`):\n\n" + distribution_table([distributed])
    text += "\n" + _depth(args, failures)
    if failures:
        text += "\nSteps that could not be measured:\n" + "".join(f"- {f}\n" for f in failures)
    print("\n" + text)
    if args.output != "-":
        write_results(Path(args.output), text)
        print(f"bench: results written to {args.output}")
    return 0


def _distribution_step(
    args: argparse.Namespace, symbols: int, failures: list[str]
) -> DistributionResult | None:
    print(
        f"bench: distribution, {symbols} symbols, {args.distribution_rate:,} events/s, "
        f"{args.distribution_clients} one-symbol + {args.distribution_full} full-stream clients …",
        flush=True,
    )
    try:
        result = run_distribution_step(
            symbols, args.distribution_rate, args.distribution_clients, args.distribution_full,
            warmup=args.warmup, baseline=min(args.duration, 8.0), duration=args.duration,
        )  # fmt: skip
    except (TimeoutError, OSError, RuntimeError) as exc:
        print(f"bench: distribution step failed: {exc!r}", flush=True)
        failures.append(f"distribution, {symbols} symbols: {exc!r}")
        return None
    print(distribution_table([result]), flush=True)
    return result


def _depth(args: argparse.Namespace, failures: list[str]) -> str:
    """The order book steps: depth under load, then syncing many books (bench/depth.py)."""
    loads: list[DepthLoadResult] = []
    if args.depth_symbols:
        # The default config first (the target), then the raw topic path of a cluster beside it.
        for separate in (False, True):
            where = "a broker process of its own" if separate else "the worker's embedded broker"
            print(
                f"bench: depth, {args.depth_symbols} symbols with diffs + {args.depth_trade_rate:,} "
                f"trades/s, {where} …",
                flush=True,
            )
            try:
                load = run_depth_load(
                    args.depth_symbols, args.depth_trade_rate, args.warmup, args.duration,
                    separate_broker=separate,
                )  # fmt: skip
                loads.append(load)
                print(depth_lines([load], None), flush=True)
            except (TimeoutError, OSError, RuntimeError) as exc:
                failures.append(f"depth load ({where}): {exc!r}")
                print(f"bench: depth step failed: {exc!r}", flush=True)
    books: BooksResult | None = None
    if args.books:
        print(f"bench: syncing {args.books:,} books of {args.book_levels} levels …", flush=True)
        try:
            books = run_books(args.books, args.book_levels)
        except (TimeoutError, OSError, RuntimeError) as exc:
            failures.append(f"books: {exc!r}")
            print(f"bench: books step failed: {exc!r}", flush=True)
    text = depth_lines(loads, books)
    print(text, flush=True)
    return text


def _machine_now() -> str:
    """The machine the bench ran on, and when."""
    return machine_line({**machine(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})


def _soak(symbols: int, rate: int, seconds: float, slice_seconds: float, warmup: float) -> int:
    print(f"bench: soak, {symbols} symbols, {rate:,} events/s for {seconds:.0f} s …", flush=True)
    result = run_step(symbols, rate, warmup=warmup, duration=seconds, slice_seconds=slice_seconds)
    print("\n" + _machine_now() + "\n" + table([result]) + "\n" + slice_table(result.slices))
    return 0


if __name__ == "__main__":
    sys.exit(main())
