"""The Tango-compatible server: what Autolab talks to.

- :mod:`.routes` — Tango's REST API over a Manager (tango-compat.md §5);
- :mod:`.jobspec` — addJob bodies and file names (pure functions);
- :mod:`.callbacks` — the POST of a finished job's output;
- :mod:`.recovery` — jobs a crash interrupted, run again;
- :mod:`.store` — the job store (SQLite, WAL);
- :mod:`.config` — ``vmpool.toml`` and the environment;
- :mod:`.app` — running it all: :func:`serve`.

The library core (``vmpool.pool``, ``scheduler``, ``manager``, ``vmms``,
models) does not import this package.
"""

from .app import running, serve
from .config import ConfigError, ServerConfig, load_config
from .routes import HELLO, TangoServer
from .store import SQLiteStore

__all__ = ["HELLO", "ConfigError", "SQLiteStore", "ServerConfig", "TangoServer", "load_config",
           "running", "serve"]
