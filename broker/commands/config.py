"""TOML configuration with environment overrides, validated against typed dataclasses.

Every error names the key and the fix (``ConfigError``); entry points turn it into exit code 2.
Environment variables override file values: ``FEDMQ_<SECTION>_<KEY>`` (upper case), e.g.
``FEDMQ_BROKER_HOST``, ``FEDMQ_BROKER_PASSWORD`` — the place for secrets and addresses.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Mapping

from fedmq.broker.contract.topics import Topics
from fedmq.broker.errors import ConfigError
from fedmq.broker.transport.client import MqttConfig, TlsConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SECRET_KEYS = {"password"}


def load_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {p} not found: pass an existing file with --config") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from None


def _coerce_env(raw: str, typ: Any, key: str) -> Any:
    base = _base_type(typ)
    try:
        if base is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if base is int:
            return int(raw)
        if base is float:
            return float(raw)
    except ValueError:
        raise ConfigError(f"environment override for {key}: {raw!r} is not a valid {base.__name__}") from None
    return raw


def _base_type(typ: Any) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else str
    return origin or typ


def _check_type(value: Any, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(typ) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__}")
        return [_check_type(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table, got {type(value).__name__}")
        return value
    if typ is Any:
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"[{key}] must be a table")
        return build(typ, value, key)
    return value


def build(cls: type, table: Mapping[str, Any], section: str, env: Mapping[str, str] | None = None) -> Any:
    """Build dataclass ``cls`` from a TOML table: unknown keys, wrong types -> ConfigError."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for k in table:
        if k not in fields:
            close = difflib.get_close_matches(k, list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"unknown key {section}.{k}{hint}")
    kwargs: dict[str, Any] = {}
    env = os.environ if env is None else env
    for name, f in fields.items():
        key = f"{section}.{name}"
        env_name = "FEDMQ_" + section.upper().replace(".", "_") + "_" + name.upper()
        typ = hints[name]
        if env_name in env and not dataclasses.is_dataclass(_base_type(typ)):
            kwargs[name] = _coerce_env(env[env_name], typ, env_name)
        elif name in table:
            kwargs[name] = _check_type(table[name], typ, key)
        elif dataclasses.is_dataclass(_base_type(typ)) and f.default is dataclasses.MISSING \
                and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing table [{key}]")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {key}: add it to the config file or set {env_name}")
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[{section}]: {e}") from None
    check = getattr(obj, "validate", None)
    if check is not None:
        check(section)
    return obj


@dataclasses.dataclass
class BrokerSection:
    """The ``[broker]`` table shared by agents and the aggregator."""

    host: str = "127.0.0.1"
    port: int = 1883
    fleet: str = "default"
    prefix: str = "fedmq"
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_insecure: bool = False
    protocol: str = "5"
    keepalive: int = 30
    max_payload: int = 1_000_000
    session_expiry: int = 3600

    def validate(self, section: str) -> None:
        if not (0 < self.port < 65536):
            raise ConfigError(f"{section}.port = {self.port} is not a TCP port: use 1-65535 (1883 plain, 8883 TLS)")
        if self.protocol not in ("5", "3.1.1"):
            raise ConfigError(f"{section}.protocol must be \"5\" or \"3.1.1\", got {self.protocol!r}")
        if self.max_payload < 1024:
            raise ConfigError(f"{section}.max_payload = {self.max_payload} is too small: use >= 1024 bytes")
        if self.keepalive < 5:
            raise ConfigError(f"{section}.keepalive must be >= 5 seconds")
        for k in ("ca_file", "cert_file", "key_file"):
            p = getattr(self, k)
            if p is not None and not Path(p).is_file():
                raise ConfigError(f"{section}.{k} = {p!r}: file not found")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError(f"{section}: set both cert_file and key_file for a client certificate, or neither")
        try:
            Topics(self.fleet, self.prefix)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"{section}.fleet/prefix: {e}") from None

    def topics(self) -> Topics:
        return Topics(self.fleet, self.prefix)

    def mqtt(self, client_id: str, **kw: Any) -> MqttConfig:
        tls = None
        if self.ca_file or self.cert_file:
            tls = TlsConfig(self.ca_file, self.cert_file, self.key_file, self.tls_insecure)
        return MqttConfig(host=self.host, port=self.port, client_id=client_id, username=self.username,
                          password=self.password, protocol=self.protocol, tls=tls, keepalive=self.keepalive,
                          max_payload=self.max_payload, **kw)


def load_tables(path: str | None, root: type, overrides: dict[str, Any] | None = None,
                raw: tuple[str, ...] = ()) -> Any:
    """Load a TOML file into the dataclass ``root`` whose fields are the tables.

    Each table is built with :func:`build` (unknown keys, types, env overrides); ``raw`` names
    tables passed through as plain dicts (validated by their owner, e.g. [strategy]).
    """
    table = load_toml(path) if path else {}
    for k, v in (overrides or {}).items():
        if isinstance(v, dict):
            table.setdefault(k, {}).update(v)
        else:
            table[k] = v
    fields = {f.name: f for f in dataclasses.fields(root)}
    for k in table:
        if k not in fields:
            raise ConfigError(f"unknown table [{k}]; known: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(root)
    kwargs = {}
    for name in fields:
        if name in raw:
            if name in table:
                kwargs[name] = dict(table[name])
        else:
            kwargs[name] = build(hints[name], table.get(name, {}), name)
    return root(**kwargs)


def write_toml(path: str | os.PathLike[str], tables: dict[str, dict[str, Any]]) -> Path:
    """Write simple tables (scalars, lists, inline tables) as TOML; ``None`` values are left out."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        return repr(v)

    lines: list[str] = []
    for t, kv in tables.items():
        lines.append(f"[{t}]")
        lines += [f"{k} = {value(v)}" for k, v in kv.items() if v is not None]
        lines.append("")
    p = Path(path)
    p.write_text("\n".join(lines))
    return p


def redact(obj: Any) -> Any:
    """A copy of a config (dataclass or dict) safe to log: secrets replaced by ``***``."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {k: ("***" if k in SECRET_KEYS and v else redact(v)) for k, v in obj.items()}
    return obj
