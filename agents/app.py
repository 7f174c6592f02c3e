"""The worker's Faust app, built from `COLLECTOR_CONFIG`: the module `faust -A agents.app worker` names.

    COLLECTOR_CONFIG=config/default.yaml faust -A agents.app worker -l info

is the same worker as `collector worker -l info`.
"""

from __future__ import annotations

import sys

from agents.worker import build_app
from streams.config import ConfigError, load_config

try:
    _config = load_config()
except ConfigError as exc:
    print(f"collector: configuration error: {exc}", file=sys.stderr)
    raise SystemExit(2) from None

app = build_app(_config)
