"""Exchange adapters, one module each, found by scanning this package.

Adding an exchange means adding one module here (plus its fixture file and simulator dialect): every
`ExchangeAdapter` subclass with a `name` is registered under that name.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from streams.exchanges.base import ExchangeAdapter


@cache
def adapters() -> dict[str, type[ExchangeAdapter]]:
    found: dict[str, type[ExchangeAdapter]] = {}
    for module in pkgutil.iter_modules(__path__):
        if module.name == "base":
            continue
        loaded = importlib.import_module(f"{__name__}.{module.name}")
        for value in vars(loaded).values():
            if (
                isinstance(value, type)
                and issubclass(value, ExchangeAdapter)
                and value is not ExchangeAdapter
                and "name" in vars(value)
            ):
                found[value.name] = value
    return found


def adapter_class(exchange: str) -> type[ExchangeAdapter]:
    try:
        return adapters()[exchange]
    except KeyError:
        known = ", ".join(sorted(adapters()))
        raise KeyError(f"unknown exchange {exchange!r} (known: {known})") from None
