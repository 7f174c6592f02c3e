"""Trades the exchange never made, for the `invent` fault: well-formed, on real streams, and false.

Three id choices (`ids`), each for a different check a collector needs:
- `far`: an id far outside the symbol's sequence, at price 1 (Binance `9000000000425`, `1.00000000`);
- `lower`: an id below the newest real one that is not a real trade. On Binance (ids count up one
  per trade) it is a real trade's id with another price and quantity; on Upbit and Bithumb it is a
  `sequential_id` never issued;
- `next`: the id the next real trade will take (Binance), or a fresh never-issued `sequential_id`
  (Upbit, Bithumb), at the last price: only the frame itself (its event type) can give it away.

The invented trades are never added to the market's history, so neither the ground truth
(`/_sim/trades`) nor any REST answer contains them. Upbit's and Bithumb's ids are made in
`simulator.upbit`, next to their id schemes. Pure: no clock, no socket.
"""

from __future__ import annotations

from typing import Literal, get_args

from simulator.market import Instrument, TakerSide, Trade, TradeHistory, format_units

IdChoice = Literal["far", "lower", "next"]
ID_CHOICES: tuple[str, ...] = get_args(IdChoice)
FAR_TRADE_ID = 9_000_000_000_425  # a Binance id no simulated symbol reaches


class InventError(Exception):
    """The market cannot back this invention yet (too few trades for a `lower` id)."""


def make_trade(
    instrument: Instrument, trade_id: int, price_ticks: int, lots: int, time_ms: int, side: TakerSide = "buy"
) -> Trade:
    return Trade(
        instrument.symbol,
        trade_id,
        format_units(price_ticks, instrument.price_decimals),
        format_units(lots, instrument.quantity_decimals),
        price_ticks,
        lots,
        side,
        time_ms,
    )


def unit_price_trade(instrument: Instrument, trade_id: int, time_ms: int) -> Trade:
    """A trade at price 1 (1.00000000 in Binance's padding) of the instrument's usual size."""
    return make_trade(instrument, trade_id, 10**instrument.price_decimals, instrument.mean_quantity, time_ms)


def odd_size(instrument: Instrument, serial: int) -> int:
    """A quantity (in lots) no real trade is likely to share: seven times the mean and then some."""
    return instrument.mean_quantity * 7 + 3 + serial


def real_trade_below_newest(history: TradeHistory, depth: int) -> Trade:
    """The real trade `depth + 1` places below the newest one (`depth` 0: the one before the newest)."""
    index = history.end - 2 - depth
    if index < history.begin:
        raise InventError(f"a lower id needs {depth + 2} trades of this symbol; there are fewer")
    return history.at(index)


def altered(instrument: Instrument, real: Trade) -> Trade:
    """The same id and time as a real trade, with another price and quantity."""
    return make_trade(
        instrument, real.id, real.price_ticks + 1, real.quantity_lots + 1, real.time, real.taker_side
    )


def binance_trade(
    instrument: Instrument, history: TradeHistory, ids: str, index: int, serial: int, now_ms: int
) -> Trade:
    """The `index`-th trade of one invention (its `serial`-th for the symbol) in Binance's id space."""
    if ids == "far":
        return unit_price_trade(instrument, FAR_TRADE_ID + serial, now_ms)
    if ids == "lower":
        return altered(instrument, real_trade_below_newest(history, serial))
    if ids != "next":
        raise ValueError(f"ids must be one of {', '.join(ID_CHOICES)}")
    newest = history.last()
    next_id = history.first_id + history.total + index
    price = newest.price_ticks if newest is not None else instrument.opening_price
    return make_trade(instrument, next_id, price, odd_size(instrument, serial), now_ms)
