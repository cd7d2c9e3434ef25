"""``havend run --config FILE``: the node's configuration, read and checked.

A YAML file; every mistake is a :class:`~havend.errors.ConfigError` naming the
field (``source.groups[0].volumes[1].path: required``). Example::

    node: {name: src1, role: source, state_dir: /var/lib/havend}
    tls: {cert: /etc/havend/src1.pem, key: /etc/havend/src1.key, ca: /etc/havend/ca.pem}
    source:
      nbd: {host: 127.0.0.1, port: 10809}
      target: {host: 10.0.0.2, port: 7788, server_name: tgt1}
      link_timeout: 30           # seconds without an ACK for sent data: reconnect
      volume_dir: /srv/havend    # volumes of groups made through the API stay in here
                                 # (default: <state_dir>/volumes)
      groups:
        - name: app1
          mode: async            # or sync: FLUSH waits for the target (RPO 0)
          rpo_seconds: 30
          compression_level: 3   # zstd; 0 = off
          bandwidth_limit: 0     # bytes/s on the wire; 0 = unlimited
          journal: {segment_size: 67108864, max_segments: 16}
          reverse_interval_seconds: 30  # failed over: pull the recovery side's changes
                                        # back this often (reverse protection); 0 = off
          checkpoints:
            interval_seconds: 300  # a periodic checkpoint; 0 = only on demand
            retain: 2048           # checkpoints the target keeps (at least 1)
            max_age_seconds: 0     # and for how long; 0 = no limit
            hooks:                 # application-consistent: freeze, checkpoint, thaw
              pre: [fsfreeze, -f, /srv]
              post: [fsfreeze, -u, /srv]
              timeout_seconds: 30  # per hook; the thaw always runs
              ssh:                 # run them there (without: on this node)
                {host: db1, user: root, key_file: /etc/havend/hooks.key,
                 known_hosts: /etc/havend/known_hosts}
          volumes:
            - {name: db, path: /srv/db.img, server: db1}   # server: the protected
            - {name: log, path: /srv/log.img, server: db1}  # server it is a disk of

    api: {host: 0.0.0.0, port: 8443}  # the REST API over HTTPS (bearer tokens); optional

    # on the target node:
    node: {name: tgt1, role: target, state_dir: /var/lib/havend}
    target:
      listen: {host: 0.0.0.0, port: 7788}
      replica_dir: /var/lib/havend/replicas
      nbd: {host: 127.0.0.1, port: 10810}   # point-in-time views (default: a free port)

Without ``tls`` a node refuses to start unless ``insecure_plaintext: true`` is
set (tests and benchmarks on one machine).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from havend.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# A protected server's name, as its inventory knows it (a host name or FQDN).
SERVER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")


@dataclass(frozen=True, slots=True)
class TLSConfig:
    cert: str
    key: str
    ca: str


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    server_name: str | None = None


@dataclass(frozen=True, slots=True)
class VolumeConfig:
    name: str
    path: str
    # The protected server this volume is a disk of (a label: the API lists
    # servers and filters volumes by it; replication does not use it).
    server: str | None = None


@dataclass(frozen=True, slots=True)
class SSHConfig:
    host: str
    user: str
    key_file: str
    known_hosts: str
    port: int = 22


@dataclass(frozen=True, slots=True)
class HooksConfig:
    pre: tuple[str, ...] = ()  # argv, run before the checkpoint
    post: tuple[str, ...] = ()  # argv, always run after it (the thaw)
    timeout_seconds: float = 30.0
    ssh: SSHConfig | None = None  # run them on the protected server, not the source node


@dataclass(frozen=True, slots=True)
class CheckpointPolicy:
    interval_seconds: float = 0.0
    retain: int = 2048
    max_age_seconds: float = 0.0
    hooks: HooksConfig | None = None


@dataclass(frozen=True, slots=True)
class GroupConfig:
    name: str
    volumes: tuple[VolumeConfig, ...]
    mode: str = "async"
    rpo_seconds: float = 30.0
    compression_level: int = 3
    bandwidth_limit: int = 0
    segment_size: int = 64 << 20
    max_segments: int = 16
    cache_bytes: int = 64 << 20  # newest journal records also kept in memory
    background_sync_bytes: int = 128 << 20  # unacknowledged journal bytes synced in the background
    checkpoints: CheckpointPolicy = field(default_factory=CheckpointPolicy)
    reverse_interval_seconds: float = 0.0  # reverse protection rounds while failed over


@dataclass(frozen=True, slots=True)
class NodeConfig:
    name: str
    role: str
    state_dir: str
    tls: TLSConfig | None
    insecure_plaintext: bool = False
    status_interval: float = 5.0  # seconds between progress lines in the log
    status_period: float = 1.0  # seconds between rewrites of status.json
    nbd: Endpoint | None = None
    target: Endpoint | None = None
    groups: tuple[GroupConfig, ...] = field(default_factory=tuple)
    listen: Endpoint | None = None
    replica_dir: str | None = None
    views: Endpoint | None = None  # the target's NBD server for point-in-time views
    api: Endpoint | None = None  # the REST API (HTTPS with the node's certificate); None: off
    volume_dir: str | None = None  # source: where volumes made through the API live
    link_timeout: float = 30.0  # unacknowledged batches this old mean a dead link


class _Reader:
    """Typed access to one mapping of the file, with the field path for errors."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{where or 'config'}: must be a mapping")
        self.data = data
        self.where = where

    def _path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kind: type, default: Any = ..., choices: tuple = ()) -> Any:
        if key not in self.data or self.data[key] is None:
            if default is ...:
                raise ConfigError(f"{self._path(key)}: required")
            return default
        value = self.data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{self._path(key)}: must be {kind.__name__}, not {value!r}")
        if kind is float and not math.isfinite(value):
            raise ConfigError(f"{self._path(key)}: must be a finite number, not {value!r}")
        if choices and value not in choices:
            raise ConfigError(f"{self._path(key)}: must be one of {', '.join(choices)}")
        return value

    def sub(self, key: str, required: bool = True) -> _Reader | None:
        if key not in self.data or self.data[key] is None:
            if required:
                raise ConfigError(f"{self._path(key)}: required")
            return None
        return _Reader(self.data[key], self._path(key))

    def items(self, key: str, *, may_be_empty: bool = False) -> list[_Reader]:
        value = self.data.get(key)
        if may_be_empty and value is None:
            return []
        if not isinstance(value, list) or (not value and not may_be_empty):
            raise ConfigError(f"{self._path(key)}: must be a non-empty list")
        return [_Reader(v, f"{self._path(key)}[{i}]") for i, v in enumerate(value)]


def _name(reader: _Reader, key: str = "name") -> str:
    value = reader.get(key, str)
    if not _NAME.match(value):
        raise ConfigError(f"{reader._path(key)}: {value!r} is not a valid name")
    return value


def _server(reader: _Reader) -> str | None:
    value = reader.get("server", str, None)
    if value is not None and not SERVER_NAME.match(value):
        raise ConfigError(
            f"{reader._path('server')}: {value!r} is not a server name (a host name: letters, "
            "digits, '.', '-', '_', up to 253 characters)"
        )
    return value


def _endpoint(reader: _Reader | None) -> Endpoint | None:
    if reader is None:
        return None
    port = reader.get("port", int)
    if not 0 <= port <= 65535:
        raise ConfigError(f"{reader._path('port')}: {port} is not a port")
    return Endpoint(
        reader.get("host", str, "127.0.0.1"), port, reader.get("server_name", str, None)
    )


def _group(reader: _Reader) -> GroupConfig:
    volumes = tuple(
        VolumeConfig(_name(v), v.get("path", str), _server(v)) for v in reader.items("volumes")
    )
    names = [v.name for v in volumes]
    if len(set(names)) != len(names):
        raise ConfigError(f"{reader._path('volumes')}: volume names must be unique")
    journal = reader.sub("journal", required=False) or _Reader({}, reader._path("journal"))
    segment_size = journal.get("segment_size", int, 64 << 20)
    if segment_size < 256 << 10 or segment_size % 4096:
        raise ConfigError(f"{journal._path('segment_size')}: a multiple of 4096, at least 256 KiB")
    max_segments = journal.get("max_segments", int, 16)
    if max_segments < 2:
        raise ConfigError(f"{journal._path('max_segments')}: at least 2")
    cache_bytes = journal.get("cache_bytes", int, 64 << 20)
    if cache_bytes < 0:
        raise ConfigError(f"{journal._path('cache_bytes')}: 0 (off) or more bytes")
    background_sync = journal.get("background_sync_bytes", int, 128 << 20)
    if background_sync < 0:
        raise ConfigError(f"{journal._path('background_sync_bytes')}: 0 (off) or more bytes")
    policy = _checkpoints(reader.sub("checkpoints", required=False))
    reverse = reader.get("reverse_interval_seconds", float, 0.0)
    if reverse != 0 and reverse < 1:
        raise ConfigError(f"{reader._path('reverse_interval_seconds')}: 0 (off) or at least 1")
    level = reader.get("compression_level", int, 3)
    if not 0 <= level <= 22:
        raise ConfigError(f"{reader._path('compression_level')}: must be 0..22")
    return GroupConfig(
        name=_name(reader),
        volumes=volumes,
        mode=reader.get("mode", str, "async", choices=("async", "sync")),
        rpo_seconds=reader.get("rpo_seconds", float, 30.0),
        compression_level=level,
        bandwidth_limit=reader.get("bandwidth_limit", int, 0),
        segment_size=segment_size,
        max_segments=max_segments,
        cache_bytes=cache_bytes,
        background_sync_bytes=background_sync,
        checkpoints=policy,
        reverse_interval_seconds=reverse,
    )


def group_from_dict(data: Any, where: str = "group") -> GroupConfig:
    """A group's settings as the config file would give them (the REST API's
    group creation): a :class:`ConfigError` names the field."""
    return _group(_Reader(data, where))


def _argv(reader: _Reader, key: str) -> tuple[str, ...]:
    value = reader.data.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise ConfigError(f"{reader._path(key)}: a command as a list of strings (argv)")
    return tuple(value)


def _checkpoints(reader: _Reader | None) -> CheckpointPolicy:
    if reader is None:
        return CheckpointPolicy()
    interval = reader.get("interval_seconds", float, 0.0)
    if interval and interval < 1:
        raise ConfigError(f"{reader._path('interval_seconds')}: 0 (off) or at least 1")
    retain = reader.get("retain", int, 2048)
    if retain < 1:
        raise ConfigError(f"{reader._path('retain')}: at least 1")
    max_age = reader.get("max_age_seconds", float, 0.0)
    if max_age < 0:
        raise ConfigError(f"{reader._path('max_age_seconds')}: 0 (no limit) or more")
    hooks = None
    hooks_reader = reader.sub("hooks", required=False)
    if hooks_reader is not None:
        timeout = hooks_reader.get("timeout_seconds", float, 30.0)
        if not 0 < timeout <= 3600:
            raise ConfigError(f"{hooks_reader._path('timeout_seconds')}: between 0 and 3600")
        ssh = None
        ssh_reader = hooks_reader.sub("ssh", required=False)
        if ssh_reader is not None:
            port = ssh_reader.get("port", int, 22)
            if not 0 < port < 65536:
                raise ConfigError(f"{ssh_reader._path('port')}: {port} is not a port")
            ssh = SSHConfig(
                ssh_reader.get("host", str),
                ssh_reader.get("user", str, "root"),
                ssh_reader.get("key_file", str),
                ssh_reader.get("known_hosts", str),
                port,
            )
        hooks = HooksConfig(_argv(hooks_reader, "pre"), _argv(hooks_reader, "post"), timeout, ssh)
        if bool(hooks.pre) != bool(hooks.post):
            raise ConfigError(f"{hooks_reader._path('post')}: pre and post go together")
    return CheckpointPolicy(interval, retain, max_age, hooks)


def parse(data: Any) -> NodeConfig:
    root = _Reader(data, "")
    node = root.sub("node")
    assert node is not None
    role = node.get("role", str, choices=("source", "target"))
    tls_reader = root.sub("tls", required=False)
    tls = (
        TLSConfig(
            tls_reader.get("cert", str), tls_reader.get("key", str), tls_reader.get("ca", str)
        )
        if tls_reader
        else None
    )
    insecure = root.get("insecure_plaintext", bool, False)
    if tls is None and not insecure:
        raise ConfigError("tls: required (or set insecure_plaintext: true for a lab)")
    common = {
        "name": _name(node),
        "role": role,
        "state_dir": node.get("state_dir", str),
        "tls": tls,
        "insecure_plaintext": insecure,
        "status_interval": root.get("status_interval", float, 5.0),
        "status_period": root.get("status_period", float, 1.0),
        "api": _endpoint(root.sub("api", required=False)),
    }
    if not 0.01 <= common["status_period"] <= 60:
        raise ConfigError("status_period: must be between 0.01 and 60 seconds")
    if role == "source":
        source = root.sub("source")
        assert source is not None
        # Groups may also be created later through the REST API.
        groups = tuple(_group(g) for g in source.items("groups", may_be_empty=True))
        names = [g.name for g in groups]
        if len(set(names)) != len(names):
            raise ConfigError("source.groups: group names must be unique")
        volume_names = [v.name for g in groups for v in g.volumes]
        if len(set(volume_names)) != len(volume_names):
            raise ConfigError("source.groups: volume names must be unique on a node")
        return NodeConfig(
            **common,
            nbd=_endpoint(source.sub("nbd", required=False)) or Endpoint("127.0.0.1", 10809),
            # Or paired later through the REST API (POST /v1/peers).
            target=_endpoint(source.sub("target", required=False)),
            groups=groups,
            link_timeout=source.get("link_timeout", float, 30.0),
            volume_dir=source.get("volume_dir", str, os.path.join(common["state_dir"], "volumes")),
        )
    target = root.sub("target")
    assert target is not None
    return NodeConfig(
        **common,
        listen=_endpoint(target.sub("listen")),
        replica_dir=target.get("replica_dir", str),
        views=_endpoint(target.sub("nbd", required=False)) or Endpoint("127.0.0.1", 0),
    )


def load(path: str) -> NodeConfig:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return parse(data)
