"""Guards every Python process a test starts (tests/guard/collector_guard.py): tests/conftest.py puts
this folder on PYTHONPATH, so the interpreter imports this module at startup."""

import collector_guard

collector_guard.install_from_environment()
