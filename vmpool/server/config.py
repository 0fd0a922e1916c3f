"""The server's configuration: one TOML file plus environment variables,
validated at start with messages that name the bad value.

    # vmpool.toml
    [server]
    host = "127.0.0.1"
    port = 3000
    keys = ["test"]
    courselabs = "/var/lib/vmpool/courselabs"
    database = "/var/lib/vmpool/jobs.sqlite"
    max_upload_bytes = 104857600
    max_output_kb = 10240            # addJob's max_kb is clamped to this
    callback_tries = 11              # then backoff 2 s doubling, at most 120 s
    callback_verify_tls = true       # false: no TLS verification (Tango's way)
    callback_ca_file = "/etc/vmpool/autolab-ca.pem"   # optional

    [vmpool]            # any field of vmpool.Settings
    default_vmms = "local"
    pool_size = 2

    [drivers.local]     # options for a driver's constructor
    memory_mb = 2048

Environment: ``RESTFUL_KEY`` (one key, as Tango), ``VMPOOL_PORT``,
``VMPOOL_HOST``, ``VMPOOL_COURSELABS``, ``VMPOOL_DATABASE``, and every
``VMPOOL_<SETTING>`` of :class:`vmpool.Settings`.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import MIB, Settings


class ConfigError(ValueError):
    pass


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 3000
    keys: list[str] = field(default_factory=lambda: ["test"])
    courselabs: str = "/var/lib/vmpool/courselabs"
    database: str = "/var/lib/vmpool/jobs.sqlite"
    max_upload_bytes: int = 100 * MIB
    #: addJob's ``max_kb`` is clamped to this (KiB); 0 or absent means
    #: the driver settings' max_output_file_size (Tango's 1000 KiB)
    max_output_kb: int = 10 * 1024
    #: callback POSTs: tries, the first pause between them (it doubles, up to
    #: callback_backoff_max). The defaults outlast Tango's (urllib3
    #: Retry(total=10, backoff_factor=1): 11 tries over ~8 min): 11 tries over
    #: ~10 min, so that an Autolab restarting meanwhile loses no grade.
    callback_tries: int = 11
    callback_backoff: float = 2.0
    callback_backoff_max: float = 120.0
    callback_timeout: float = 30.0
    #: TLS of https callbacks: verified against the system's CAs, or against
    #: callback_ca_file (PEM) when set (an Autolab with an internal CA or a
    #: self-signed certificate). callback_verify_tls = false turns
    #: verification off, as Tango does (requests' verify=False).
    callback_verify_tls: bool = True
    callback_ca_file: str | None = None
    #: the file this configuration was read from (jobs never see it)
    config_file: str | None = None
    settings: Settings = field(default_factory=Settings)

    def private_paths(self) -> list[str]:
        """What the server keeps that no job may see: courselabs, the job
        database (its WAL files, its owner id), the configuration file."""
        db = str(Path(self.database).absolute())
        paths = [str(Path(self.courselabs).absolute()), db, f"{db}-wal", f"{db}-shm",
                 f"{db}.owner"]
        if self.config_file:
            paths.append(str(Path(self.config_file).absolute()))
        return paths

    def job_settings(self) -> Settings:
        """The manager's settings, with the server's private paths handed to
        the local driver (which covers them in every sandbox)."""
        options = {name: dict(o) for name, o in self.settings.driver_options.items()}
        local = options.setdefault("local", {})
        local["hidden_paths"] = [*local.get("hidden_paths", []), *self.private_paths()]
        return dataclasses.replace(self.settings, driver_options=options)

    def validate(self) -> None:
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(f"server.port must be within 0..65535, got {self.port}")
        if not self.keys or not all(isinstance(k, str) and k for k in self.keys):
            problems.append(f"server.keys must be non-empty strings, got {self.keys!r}")
        if self.max_upload_bytes <= 0:
            problems.append(f"server.max_upload_bytes must be > 0, got {self.max_upload_bytes}")
        if self.callback_tries < 1:
            problems.append(f"server.callback_tries must be >= 1, got {self.callback_tries}")
        if self.max_output_kb <= 0:
            problems.append(f"server.max_output_kb must be > 0, got {self.max_output_kb}")
        if self.callback_backoff < 0 or self.callback_backoff_max < 0:
            problems.append("server.callback_backoff and callback_backoff_max must be >= 0")
        if self.callback_ca_file is not None:
            try:
                ssl.create_default_context(cafile=self.callback_ca_file)
            except (OSError, ssl.SSLError) as e:
                problems.append(f"server.callback_ca_file {self.callback_ca_file!r} is not a"
                                f" readable PEM file of certificates: {e}")
        if problems:
            raise ConfigError("; ".join(problems))


_SERVER_FIELDS = {f.name: f for f in dataclasses.fields(ServerConfig)
                  if f.name not in ("settings", "config_file")}


def load_config(path: str | None = None, environ: Mapping[str, str] | None = None) -> ServerConfig:
    env = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    unknown = set(data) - {"server", "vmpool", "drivers"}
    if unknown:
        raise ConfigError(f"unknown section(s) in {path}: {', '.join(sorted(unknown))}")
    server = dict(data.get("server", {}))
    bad = set(server) - set(_SERVER_FIELDS)
    if bad:
        raise ConfigError(f"unknown [server] setting(s): {', '.join(sorted(bad))}")
    for name, var in (("port", "VMPOOL_PORT"), ("host", "VMPOOL_HOST"),
                      ("courselabs", "VMPOOL_COURSELABS"), ("database", "VMPOOL_DATABASE")):
        if var in env:
            server[name] = env[var]
    if "RESTFUL_KEY" in env:
        server["keys"] = [env["RESTFUL_KEY"]]
    try:
        if "port" in server:
            server["port"] = int(server["port"])
    except ValueError:
        raise ConfigError(f"server.port must be an integer, got {server['port']!r}") from None
    vm_settings = dict(data.get("vmpool", {}))
    known = {f.name for f in dataclasses.fields(Settings)}
    bad = set(vm_settings) - known
    if bad:
        raise ConfigError(f"unknown [vmpool] setting(s): {', '.join(sorted(bad))}")
    drivers = data.get("drivers", {})
    if not isinstance(drivers, dict):
        raise ConfigError("[drivers] must be a table of tables")
    vm_settings.setdefault("driver_options", {}).update(drivers)
    try:
        settings = Settings.from_env(env, **vm_settings)
        cfg = ServerConfig(**server, settings=settings, config_file=path)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None
    cfg.validate()
    return cfg
