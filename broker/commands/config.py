"""TOML configuration with environment overrides, validated against typed dataclasses.

Every error names the key and the fix (``ConfigError``); entry points turn it into exit code 2.
Environment variables override file values: ``FEDMQ_<TABLE>_<KEY>`` (upper case), e.g.
``FEDMQ_BROKER_HOST``, ``FEDMQ_BROKER_PASSWORD`` — the place for secrets and addresses. Every key
can be overridden: numbers, booleans and strings as text, lists as a TOML/JSON array literal
(``["a", "b"]``, ``[9, 10]``) or comma-separated (``a,b``), and keys of free-form tables such as
``[strategy]`` as TOML values (``FEDMQ_STRATEGY_SERVER_LR=0.5`` sets ``server.lr``). A variable
naming a known table but an unknown key is an error, like an unknown key in the file.
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

import paho.mqtt.client as mqtt_client

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


def _toml_value(raw: str) -> Any:
    """``raw`` read as one TOML value (array, inline table, number, bool, quoted string); KeyError if not."""
    try:
        return tomllib.loads("v = " + raw)["v"]
    except tomllib.TOMLDecodeError:
        raise KeyError(raw) from None


def _coerce_env(raw: str, typ: Any, key: str) -> Any:
    base = _base_type(typ)
    if base in (list, tuple):
        return _coerce_env_list(raw, typ, key)
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


def _coerce_env_list(raw: str, typ: Any, key: str) -> list[Any]:
    """A list from an environment variable: a TOML/JSON array literal, or comma-separated items."""
    text = raw.strip()
    if text.startswith("["):
        try:
            return _toml_value(text)
        except KeyError:
            raise ConfigError(f"environment override for {key}: {raw!r} is not a valid array literal: "
                              "write [\"a\", \"b\"], [1, 2] or a comma-separated list a,b") from None
    inner = typing.get_args(_strip_optional(typ)) or (str,)
    items = [x.strip() for x in text.split(",") if x.strip()]
    return [_coerce_env(x, inner[0], f"{key}[{i}]") for i, x in enumerate(items)]


def _strip_optional(typ: Any) -> Any:
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        return args[0] if len(args) == 1 else typ
    return typ


def _env_prefix(table: str) -> str:
    return "FEDMQ_" + table.upper().replace(".", "_") + "_"


def env_name(table: str, key: str) -> str:
    """The environment variable that overrides ``[table] key``."""
    return _env_prefix(table) + key.upper()


def _check_env_names(section: str, known: Any, env: Mapping[str, str]) -> None:
    """An override naming table ``section`` but no key of it is a typo: refuse it like an unknown key."""
    prefix = _env_prefix(section)
    names = {env_name(section, k) for k in known}
    for var in env:
        if var.startswith(prefix) and var not in names:
            close = difflib.get_close_matches(var, list(names), n=1)
            raise ConfigError(f"environment variable {var} names no key of [{section}]"
                              + (f" (did you mean {close[0]}?)" if close else
                                 f"; known: {', '.join(sorted(names))}"))


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
        return build(typing.cast(type, typ), value, key)
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
    _check_env_names(section, fields, env)
    for name, f in fields.items():
        key = f"{section}.{name}"
        var = env_name(section, name)
        typ = hints[name]
        if var in env and not dataclasses.is_dataclass(_base_type(typ)):
            kwargs[name] = _check_type(_coerce_env(env[var], typ, var), typ, f"{key} (from {var})")
        elif name in table:
            kwargs[name] = _check_type(table[name], typ, key)
        elif dataclasses.is_dataclass(_base_type(typ)) and f.default is dataclasses.MISSING \
                and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing table [{key}]")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {key}: add it to the config file or set {var}")
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
        if not (0 <= self.session_expiry <= 0xFFFFFFFF):
            raise ConfigError(f"{section}.session_expiry = {self.session_expiry}: use 0 (clean sessions) to "
                              "4294967295 seconds")
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

    def mqtt(self, client_id: str, *, resume_session: bool = False, **kw: Any) -> MqttConfig:
        """Connection settings for ``client_id``.

        ``resume_session`` (the aggregator): under MQTT 5 with ``session_expiry > 0`` the first
        connect of the process starts a clean session and every reconnect resumes it
        (``clean_start`` first-only plus a Session Expiry Interval), so QoS 1 messages published
        to its subscriptions during a short connection loss are queued by the broker and
        delivered on reconnect. A restarted process starts clean: its in-memory state is gone,
        and a stale backlog would only be rejected. Agents keep clean sessions: everything they
        subscribe to is retained, so a resumed session would only queue model-size copies.
        """
        if resume_session and self.protocol == "5" and self.session_expiry > 0:
            kw.setdefault("clean_start", mqtt_client.MQTT_CLEAN_START_FIRST_ONLY)
            kw.setdefault("session_expiry", self.session_expiry)
        tls = None
        if self.ca_file or self.cert_file:
            tls = TlsConfig(self.ca_file, self.cert_file, self.key_file, self.tls_insecure)
        return MqttConfig(host=self.host, port=self.port, client_id=client_id, username=self.username,
                          password=self.password, protocol=self.protocol, tls=tls, keepalive=self.keepalive,
                          max_payload=self.max_payload, **kw)


def _env_raw_table(section: str, table: dict[str, Any], keys: Any, env: Mapping[str, str]) -> dict[str, Any]:
    """Apply ``FEDMQ_<SECTION>_<KEY>`` overrides to a free-form table (its owner validates the keys).

    ``keys`` are the table's known top-level keys: a variable whose suffix is one of them sets it
    (``FEDMQ_STRATEGY_MAX_UPDATES`` -> ``max_updates``); otherwise, when the suffix starts with a
    known key (or a sub-table of the file), the rest is a key of that sub-table
    (``FEDMQ_STRATEGY_SERVER_LR`` -> ``server.lr``). Values are TOML values (``0.5``, ``true``,
    ``["a", "b"]``, ``{ lr = 0.5 }``); anything else is a plain string (``fedadam``).
    """
    prefix = _env_prefix(section)
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in table.items()}
    known = set(keys or ())
    subs = known | {k for k, v in table.items() if isinstance(v, dict)}
    for var in sorted(env):
        if not var.startswith(prefix) or len(var) == len(prefix):
            continue
        key = var[len(prefix):].lower()
        try:
            value = _toml_value(env[var])
        except KeyError:
            value = env[var]
        head, _, rest = key.partition("_")
        if key not in known and head in subs and rest:
            sub = out.get(head)
            sub = dict(sub) if isinstance(sub, dict) else {}
            sub[rest] = value
            out[head] = sub
        else:
            out[key] = value
    return out


def load_tables(path: str | None, root: type, overrides: dict[str, Any] | None = None,
                raw: tuple[str, ...] | Mapping[str, tuple[str, ...]] = (),
                env: Mapping[str, str] | None = None) -> Any:
    """Load a TOML file into the dataclass ``root`` whose fields are the tables.

    Each table is built with :func:`build` (unknown keys, types, env overrides); ``raw`` names
    tables passed through as plain dicts (validated by their owner, e.g. [strategy]); as a mapping
    it also gives each raw table's known keys, which resolve ``FEDMQ_<TABLE>_<SUB>_<KEY>``
    overrides of its sub-tables (see :func:`_env_raw_table`).
    """
    env = os.environ if env is None else env
    raw_subs = dict(raw) if isinstance(raw, Mapping) else {name: () for name in raw}
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
        if name in raw_subs:
            if not isinstance(table.get(name, {}), dict):
                raise ConfigError(f"[{name}] must be a table")
            has_env = any(v.startswith(_env_prefix(name)) for v in env)
            if name in table or has_env:
                kwargs[name] = _env_raw_table(name, dict(table.get(name, {})), raw_subs[name], env)
        else:
            kwargs[name] = build(hints[name], table.get(name, {}), name, env)
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


def check_writable_dir(path: str | os.PathLike[str], key: str) -> None:
    """ConfigError unless ``path`` is (or can be created as) a directory this process can write.

    Checked by writing a probe file (permission bits say nothing for root, nor for a read-only
    mount); a directory that does not exist yet is not created: its nearest existing parent
    must be a writable directory.
    """
    import tempfile

    p = Path(path).expanduser()
    target = p
    while not target.exists():
        if target.parent == target:
            break
        target = target.parent
    if not target.is_dir():
        raise ConfigError(f"{key} = {str(path)!r}: {target} is not a directory: choose a directory path")
    try:
        with tempfile.NamedTemporaryFile(dir=target, prefix=".fedmq-check-"):
            pass
    except OSError as e:
        what = "" if target == p else f" (it does not exist yet, and its parent {target} is not writable)"
        raise ConfigError(f"{key} = {str(path)!r} is not writable{what}: {e.strerror or e}; choose a writable "
                          "directory or give this user write access to it") from None
