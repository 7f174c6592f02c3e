"""`collector.commands` records: runtime subscription changes and recovery orders.

Subscription commands are produced by `collector subscribe|unsubscribe`, by `POST|DELETE /subscriptions`
and by the dashboard; the control agent applies them to the subscription table the source agents follow.
Recovery orders come from the manager (agents/state.py), sent to the partition of the connector's group
so the control agent of the worker running that group recycles its connections.
"""

from __future__ import annotations

from typing import Literal

import msgspec


class SubscriptionCommand(msgspec.Struct, rename="camel", frozen=True):
    action: Literal["subscribe", "unsubscribe"]
    exchange: str
    symbol: str  # normalized BASE/QUOTE
    data_types: list[str]  # e.g. ["trade", "kline_1m"]
    command_id: str  # unique; lets the control agent ignore a replayed command
    requested_at: int  # epoch ms


class RecoveryCommand(msgspec.Struct, rename="camel", frozen=True):
    action: Literal["recover"]
    exchange: str
    group: str  # the connection group, e.g. "binance:3"; its partition is the group number
    connector: str  # the connector (slot) to recycle, e.g. "binance-3" or "binance-3.1"
    attempt: int  # recovery orders since the connector was last healthy, this one included
    reason: str
    command_id: str
    requested_at: int  # epoch ms; an order that waited too long is stale and skipped


ControlCommand = SubscriptionCommand | RecoveryCommand


class _Action(msgspec.Struct):
    action: str


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(SubscriptionCommand)
_recovery_decoder = msgspec.json.Decoder(RecoveryCommand)
_action_decoder = msgspec.json.Decoder(_Action)


def encode_command(command: ControlCommand) -> bytes:
    return _encoder.encode(command)


def decode_command(payload: bytes) -> SubscriptionCommand:
    return _decoder.decode(payload)


def recovery_order_expired(command: RecoveryCommand, now: int, max_age_ms: int) -> bool:
    """An order older than this was read again after a restart or waited out an outage: act on none of it."""
    return now - command.requested_at > max_age_ms


def decode_control_command(payload: bytes) -> ControlCommand:
    """Either kind of command, told apart by `action`; msgspec errors for anything else."""
    if _action_decoder.decode(payload).action == "recover":
        return _recovery_decoder.decode(payload)
    return _decoder.decode(payload)
