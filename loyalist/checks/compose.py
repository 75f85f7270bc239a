"""Static validation of ``docker-compose.yml`` for machines without a Docker engine (CI runs it in
``make lint``): ``python -m loyalist.checks.compose docker-compose.yml``.

Beyond "it parses", it checks that the file is coherent with itself and with the repository:

- every service has a pinned image or a build whose context, Dockerfile and ``COPY`` sources exist (and are
  not excluded by ``.dockerignore``); services sharing an image tag share one build;
- ports parse, published host ports do not collide; named volumes are declared (and used), bind-mount
  sources exist in the repo; ``env_file``/``configs``/``secrets`` files exist;
- ``depends_on`` names existing services with a valid condition (``service_healthy`` needs a healthcheck,
  ``service_completed_successfully`` a one-shot), without cycles;
- Loyalist containers (``python -m services.<name>`` / ``python -m loyalist...``): the module exists, every
  ``LOYALIST_*`` variable is a real setting with a valid value, the service listens on ``0.0.0.0`` at the
  published port, every host/URL it is configured to reach is a compose service listening on that port,
  Kafka advertises that address, and the stream services wait for the one-shot topic/keyspace bootstrap;
- Prometheus' mounted scrape config targets compose services on ports they listen on and its rule files
  exist; Grafana's provisioned datasources point at such services and its dashboard folders hold valid
  dashboard JSON whose datasource references resolve.

Exit status 1 and one line per problem when anything is wrong.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import fnmatch
import json
import re
import shlex
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import ValidationError

from loyalist.settings import SERVICE_NAMES, Settings

TOP_LEVEL_KEYS = {"name", "services", "volumes", "networks", "configs", "secrets", "include"}
SERVICE_KEYS = {
    "build", "cap_add", "cap_drop", "cgroup", "command", "configs", "container_name", "cpus", "depends_on",
    "deploy", "devices", "dns", "domainname", "entrypoint", "env_file", "environment", "expose", "extra_hosts",
    "healthcheck", "hostname", "image", "init", "ipc", "labels", "links", "logging", "mem_limit",
    "mem_reservation", "network_mode", "networks", "pid", "platform", "ports", "privileged", "profiles",
    "pull_policy", "read_only", "restart", "secrets", "security_opt", "shm_size", "stdin_open",
    "stop_grace_period", "stop_signal", "sysctls", "tmpfs", "tty", "ulimits", "user", "volumes", "working_dir",
}
DEPENDS_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
RESTART_POLICIES = re.compile(r"^(no|always|unless-stopped|on-failure(:\d+)?)$")
DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|ms|s|m|h))+$")
PORT_SPEC = re.compile(
    r"^(?:(?P<ip>\d{1,3}(?:\.\d{1,3}){3}|\[[0-9a-fA-F:]+\]):)?(?:(?P<published>\d+(?:-\d+)?)?:)?"
    r"(?P<target>\d+(?:-\d+)?)(?:/(?P<proto>tcp|udp|sctp))?$"
)
INTERPOLATION = re.compile(r"\$\$|\$\{(?P<braced>[^}]+)\}|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)")
LOOPBACK = {"127.0.0.1", "localhost", "0.0.0.0", "::1", "::"}
ANY_ADDRESS = {"0.0.0.0", "::"}


@dataclass(frozen=True)
class Problem:
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass(frozen=True)
class PortMapping:
    host_ip: str
    published: int | None
    target: int
    protocol: str


@dataclass(frozen=True)
class Mount:
    kind: str  # "bind", "volume" or "tmpfs"
    source: str | None
    target: str
    read_only: bool


@dataclass
class Service:
    name: str
    spec: dict[str, Any]
    environment: dict[str, str] = field(default_factory=dict)
    ports: list[PortMapping] = field(default_factory=list)
    mounts: list[Mount] = field(default_factory=list)

    @property
    def command(self) -> list[str]:
        return _as_argv(self.spec.get("command"))

    @property
    def python_module(self) -> str | None:
        """The module of a ``python -m X`` command, if that is what the container runs."""
        argv = self.command
        for i, arg in enumerate(argv[:-1]):
            if arg == "-m" and i > 0 and PurePosixPath(argv[i - 1]).name.startswith("python"):
                return argv[i + 1]
        return None

    @property
    def is_loyalist(self) -> bool:
        module = self.python_module or ""
        return module.startswith(("services.", "loyalist"))

    @property
    def loyalist_service(self) -> str | None:
        module = self.python_module or ""
        name = module.removeprefix("services.")
        return name if module.startswith("services.") and name in SERVICE_NAMES else None

    def listening_ports(self) -> set[int]:
        ports = {p.target for p in self.ports}
        for item in self.spec.get("expose") or []:
            text = str(item).split("/")[0]
            if text.isdigit():
                ports.add(int(text))
        return ports


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose variable substitution with the defaults written in the file (and ``env`` when given).

    >>> interpolate("${SECRET:-dev}-$$x", {})
    'dev-$x'
    >>> interpolate("${SECRET:-dev}", {"SECRET": "s"})
    's'
    """
    env = {} if env is None else env

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        expr = match.group("braced") or match.group("bare") or ""
        for op in (":-", "-", ":?", "?"):
            if op in expr:
                name, default = expr.split(op, 1)
                if op.endswith("-"):
                    got = env.get(name)
                    return default if got is None or (op == ":-" and got == "") else got
                return env.get(name, "")
        return env.get(expr, "")

    return INTERPOLATION.sub(replace, value)


def _as_argv(command: Any) -> list[str]:
    if command is None:
        return []
    if isinstance(command, str):
        return shlex.split(command)
    return [str(part) for part in command]


def parse_port(item: Any) -> list[PortMapping]:
    """Short or long port syntax to mappings (ranges expanded).

    >>> parse_port("127.0.0.1:9092:9092")
    [PortMapping(host_ip='127.0.0.1', published=9092, target=9092, protocol='tcp')]
    >>> parse_port("8001")
    [PortMapping(host_ip='0.0.0.0', published=None, target=8001, protocol='tcp')]
    """
    if isinstance(item, dict):
        target = int(item["target"])
        published = item.get("published")
        return [PortMapping(str(item.get("host_ip", "0.0.0.0")), int(published) if published else None, target,
                            str(item.get("protocol", "tcp")))]
    match = PORT_SPEC.match(str(item))
    if not match:
        raise ValueError(f"cannot parse port {item!r}")
    targets = _port_range(match.group("target"))
    published = _port_range(match.group("published")) if match.group("published") else [None] * len(targets)
    if len(published) != len(targets):
        raise ValueError(f"port ranges differ in length: {item!r}")
    out = []
    for host, target in zip(published, targets, strict=True):
        for port in (host, target):
            if port is not None and not 1 <= port <= 65535:
                raise ValueError(f"port out of range in {item!r}")
        out.append(PortMapping(match.group("ip") or "0.0.0.0", host, target, match.group("proto") or "tcp"))
    return out


def _port_range(text: str) -> list[int]:
    if "-" in text:
        low, high = (int(p) for p in text.split("-"))
        return list(range(low, high + 1))
    return [int(text)]


def parse_mount(item: Any) -> Mount:
    """Short or long volume syntax.

    >>> parse_mount("./deploy/prometheus/rules:/etc/prometheus/rules:ro")
    Mount(kind='bind', source='./deploy/prometheus/rules', target='/etc/prometheus/rules', read_only=True)
    >>> parse_mount("kafka-data:/var/lib/kafka/data").kind
    'volume'
    """
    if isinstance(item, dict):
        kind = str(item.get("type", "volume"))
        return Mount(kind, item.get("source"), str(item.get("target", "")), bool(item.get("read_only", False)))
    parts = str(item).split(":")
    if len(parts) == 1:
        return Mount("volume", None, parts[0], False)  # anonymous volume
    source, target, *rest = parts
    mode = rest[0] if rest else "rw"
    kind = "bind" if source.startswith((".", "/", "~")) else "volume"
    return Mount(kind, source, target, "ro" in mode.split(","))


class ComposeCheck:
    def __init__(self, compose_file: Path, env: dict[str, str] | None = None, root: Path | None = None) -> None:
        self.path = compose_file
        # Relative paths in the file resolve against its directory (``root`` overrides it, for tests).
        self.root = (root or compose_file.parent).resolve()
        # Interpolation uses the file's own defaults, not the caller's shell: CI checks the file as shipped.
        self.env = env or {}
        self.problems: list[Problem] = []
        self.doc: dict[str, Any] = {}
        self.services: dict[str, Service] = {}

    def problem(self, where: str, message: str) -> None:
        self.problems.append(Problem(where, message))

    # ---- entry point ----------------------------------------------------------------------------------
    def run(self) -> list[Problem]:
        try:
            loaded = yaml.safe_load(self.path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            self.problem(str(self.path), f"cannot read YAML: {exc}")
            return self.problems
        if not isinstance(loaded, dict) or not isinstance(loaded.get("services"), dict) or not loaded["services"]:
            self.problem(str(self.path), "no 'services' mapping")
            return self.problems
        self.doc = loaded
        for key in loaded:
            if key == "version":
                self.problem("version", "obsolete top-level key; Compose ignores it, remove it")
            elif key not in TOP_LEVEL_KEYS and not str(key).startswith("x-"):
                self.problem(str(key), "unknown top-level key")
        for name, spec in loaded["services"].items():
            if not isinstance(spec, dict):
                self.problem(f"services.{name}", "must be a mapping")
                continue
            self.services[name] = self._load_service(name, spec)
        for svc in self.services.values():
            self._check_service(svc)
        self._check_host_ports()
        self._check_volumes_declared_and_used()
        self._check_top_level_files()
        self._check_dependency_cycles()
        self._check_shared_images()
        for svc in self.services.values():
            if svc.is_loyalist:
                self._check_loyalist(svc)
            image = str(svc.spec.get("image", ""))
            if image.startswith(("prom/prometheus", "quay.io/prometheus/prometheus")):
                self._check_prometheus(svc)
            if image.startswith("grafana/grafana"):
                self._check_grafana(svc)
            if image.startswith("apache/kafka"):
                self._check_kafka(svc)
        return self.problems

    # ---- loading --------------------------------------------------------------------------------------
    def _load_service(self, name: str, spec: dict[str, Any]) -> Service:
        svc = Service(name, spec)
        env = spec.get("environment") or {}
        if isinstance(env, list):
            env = {str(item).partition("=")[0]: str(item).partition("=")[2] for item in env}
        if not isinstance(env, dict):
            self.problem(f"services.{name}.environment", "must be a mapping or a list of KEY=VALUE")
            env = {}
        svc.environment = {str(k): interpolate("" if v is None else str(v), self.env) for k, v in env.items()}
        for i, item in enumerate(spec.get("ports") or []):
            try:
                svc.ports.extend(parse_port(item))
            except (ValueError, KeyError, TypeError) as exc:
                self.problem(f"services.{name}.ports[{i}]", str(exc))
        for i, item in enumerate(spec.get("volumes") or []):
            try:
                svc.mounts.append(parse_mount(item))
            except (ValueError, TypeError) as exc:
                self.problem(f"services.{name}.volumes[{i}]", str(exc))
        return svc

    # ---- per service ----------------------------------------------------------------------------------
    def _check_service(self, svc: Service) -> None:
        where = f"services.{svc.name}"
        for key in svc.spec:
            if key not in SERVICE_KEYS and not str(key).startswith("x-"):
                self.problem(f"{where}.{key}", "unknown service key (typo?)")
        if "image" not in svc.spec and "build" not in svc.spec:
            self.problem(where, "needs an 'image' or a 'build'")
        if "build" in svc.spec:
            self._check_build(svc)
        elif "image" in svc.spec:
            self._check_image_pinned(f"{where}.image", str(svc.spec["image"]))
        restart = svc.spec.get("restart")
        if restart is not None and not RESTART_POLICIES.match(str(restart)):
            self.problem(f"{where}.restart", f"invalid policy {restart!r}")
        for i, port in enumerate(svc.ports):
            if port.published is None:
                self.problem(f"{where}.ports[{i}]", f"container port {port.target} published on a random host "
                                                    "port; give it a fixed one or use 'expose'")
        targets = [m.target for m in svc.mounts]
        for mount in svc.mounts:
            if not mount.target.startswith("/"):
                self.problem(f"{where}.volumes", f"mount target {mount.target!r} must be an absolute path")
            if targets.count(mount.target) > 1:
                self.problem(f"{where}.volumes", f"two mounts on {mount.target}")
            if mount.kind == "bind" and mount.source:
                self._check_bind_source(f"{where}.volumes", mount.source)
        for i, item in enumerate(_as_list(svc.spec.get("env_file"))):
            path = item.get("path") if isinstance(item, dict) else item
            required = item.get("required", True) if isinstance(item, dict) else True
            if required and not (self.root / str(path)).is_file():
                self.problem(f"{where}.env_file[{i}]", f"{path} does not exist")
        for kind in ("configs", "secrets"):
            declared = self.doc.get(kind) or {}
            for item in svc.spec.get(kind) or []:
                ref = item.get("source") if isinstance(item, dict) else item
                if ref not in declared:
                    self.problem(f"{where}.{kind}", f"{ref!r} is not declared under top-level '{kind}'")
        self._check_depends_on(svc)
        self._check_healthcheck(svc)

    def _check_image_pinned(self, where: str, image: str) -> None:
        name = image.split("@")[0]
        last = name.rsplit("/", 1)[-1]
        if "@sha256:" in image:
            return
        if ":" not in last:
            self.problem(where, f"{image!r} has no tag; pin a version")
        elif last.endswith(":latest"):
            self.problem(where, f"{image!r} uses 'latest'; pin a version")

    def _check_build(self, svc: Service) -> None:
        where = f"services.{svc.name}.build"
        build = svc.spec["build"]
        if isinstance(build, str):
            build = {"context": build}
        if not isinstance(build, dict):
            self.problem(where, "must be a path or a mapping")
            return
        context = (self.root / str(build.get("context", "."))).resolve()
        if not context.is_dir():
            self.problem(f"{where}.context", f"{context} is not a directory")
            return
        dockerfile = context / str(build.get("dockerfile", "Dockerfile"))
        if not dockerfile.is_file():
            self.problem(f"{where}.dockerfile", f"{dockerfile} does not exist")
            return
        for problem in check_dockerfile(dockerfile, context):
            self.problem(f"{where} ({dockerfile.name})", problem)

    def _check_bind_source(self, where: str, source: str) -> None:
        if source.startswith(("/", "~")):
            self.problem(where, f"bind source {source!r} is outside the repository; use a path relative to it")
            return
        path = (self.root / source).resolve()
        if not path.exists():
            self.problem(where, f"bind source {source} does not exist")
        elif self.root not in path.parents and path != self.root:
            self.problem(where, f"bind source {source} escapes the repository")

    def _check_depends_on(self, svc: Service) -> None:
        where = f"services.{svc.name}.depends_on"
        for dep, condition in self._dependencies(svc).items():
            if dep == svc.name:
                self.problem(where, "a service cannot depend on itself")
                continue
            target = self.services.get(dep)
            if target is None:
                self.problem(where, f"unknown service {dep!r}")
                continue
            if condition not in DEPENDS_CONDITIONS:
                self.problem(f"{where}.{dep}", f"invalid condition {condition!r}")
            elif condition == "service_healthy" and not _has_healthcheck(target):
                self.problem(f"{where}.{dep}", f"service_healthy, but {dep} defines no healthcheck")
            elif condition == "service_completed_successfully" and str(
                target.spec.get("restart", "no")
            ) in {"always", "unless-stopped"}:
                self.problem(f"{where}.{dep}", f"waits for {dep} to complete, but {dep} restarts forever")

    def _dependencies(self, svc: Service) -> dict[str, str]:
        deps = svc.spec.get("depends_on") or {}
        if isinstance(deps, list):
            return {str(d): "service_started" for d in deps}
        if isinstance(deps, dict):
            return {str(d): str((c or {}).get("condition", "service_started")) for d, c in deps.items()}
        self.problem(f"services.{svc.name}.depends_on", "must be a list or a mapping")
        return {}

    def _check_healthcheck(self, svc: Service) -> None:
        check = svc.spec.get("healthcheck")
        if check is None:
            return
        where = f"services.{svc.name}.healthcheck"
        test = check.get("test")
        if isinstance(test, list):
            if not test or test[0] not in {"CMD", "CMD-SHELL", "NONE"}:
                self.problem(f"{where}.test", "a list test must start with CMD, CMD-SHELL or NONE")
        elif not isinstance(test, str) and not check.get("disable"):
            self.problem(f"{where}.test", "missing or not a string/list")
        for key in ("interval", "timeout", "start_period", "start_interval"):
            if key in check and not DURATION.match(str(check[key])):
                self.problem(f"{where}.{key}", f"invalid duration {check[key]!r}")
        if "retries" in check and not isinstance(check["retries"], int):
            self.problem(f"{where}.retries", "must be an integer")

    # ---- whole file -----------------------------------------------------------------------------------
    def _check_host_ports(self) -> None:
        seen: dict[tuple[int, str], list[tuple[str, str]]] = {}
        for svc in self.services.values():
            for port in svc.ports:
                if port.published is None:
                    continue
                for other_ip, other in seen.get((port.published, port.protocol), []):
                    if other_ip == port.host_ip or ANY_ADDRESS & {other_ip, port.host_ip}:
                        self.problem(f"services.{svc.name}.ports",
                                     f"host port {port.published}/{port.protocol} also published by {other}")
                seen.setdefault((port.published, port.protocol), []).append((port.host_ip, svc.name))

    def _check_volumes_declared_and_used(self) -> None:
        declared = set((self.doc.get("volumes") or {}).keys())
        used: set[str] = set()
        for svc in self.services.values():
            for mount in svc.mounts:
                if mount.kind == "volume" and mount.source:
                    used.add(mount.source)
                    if mount.source not in declared:
                        self.problem(f"services.{svc.name}.volumes",
                                     f"named volume {mount.source!r} is not declared under top-level 'volumes'")
        for unused in sorted(declared - used):
            self.problem(f"volumes.{unused}", "declared but no service mounts it")

    def _check_top_level_files(self) -> None:
        for kind in ("configs", "secrets"):
            for name, spec in (self.doc.get(kind) or {}).items():
                if isinstance(spec, dict) and "file" in spec and not (self.root / str(spec["file"])).is_file():
                    self.problem(f"{kind}.{name}.file", f"{spec['file']} does not exist")

    def _check_dependency_cycles(self) -> None:
        graph = {name: [d for d in self._dependencies(svc) if d in self.services]
                 for name, svc in self.services.items()}
        state: dict[str, int] = {}

        def visit(node: str, path: list[str]) -> None:
            state[node] = 1
            for dep in graph[node]:
                if state.get(dep) == 1:
                    cycle = [*path[path.index(dep):], dep] if dep in path else [node, dep]
                    self.problem("depends_on", "cycle: " + " -> ".join(cycle))
                elif dep not in state:
                    visit(dep, [*path, dep])
            state[node] = 2

        for name in graph:
            if name not in state:
                visit(name, [name])

    def _check_shared_images(self) -> None:
        builds: dict[str, tuple[str, Any]] = {}
        for svc in self.services.values():
            if "build" in svc.spec and "image" in svc.spec:
                image = str(svc.spec["image"])
                first = builds.setdefault(image, (svc.name, svc.spec["build"]))
                if first[1] != svc.spec["build"]:
                    self.problem(f"services.{svc.name}.build",
                                 f"tags {image} like {first[0]} but with a different build; one tag, one build")

    # ---- container ↔ container references -------------------------------------------------------------
    def _reachable(self, where: str, host: str, port: int, from_service: Service) -> None:
        """``host:port`` as seen from inside ``from_service`` must be a compose service listening there."""
        if host in LOOPBACK:
            if port not in from_service.listening_ports():
                self.problem(where, f"{host}:{port} is {from_service.name} itself, which does not listen on {port}")
            return
        if "." in host:
            return  # a fully qualified external name: outside this file's scope
        target = self.services.get(host)
        if target is None:
            self.problem(where, f"{host}:{port}: no service named {host!r}")
        elif port not in target.listening_ports():
            self.problem(where, f"{host}:{port}: {host} neither publishes nor exposes port {port} "
                                f"(it listens on {sorted(target.listening_ports()) or 'nothing declared'})")

    def _check_loyalist(self, svc: Service) -> None:
        where = f"services.{svc.name}"
        module = svc.python_module or ""
        if not _module_exists(self.root, module):
            self.problem(f"{where}.command", f"python -m {module}: no such module in the repository")
        loyalist_env = {k: v for k, v in svc.environment.items() if k.startswith("LOYALIST_")}
        fields = Settings.model_fields
        values: dict[str, str] = {}
        for key, value in loyalist_env.items():
            field_name = key.removeprefix("LOYALIST_").lower()
            if field_name not in fields:
                self.problem(f"{where}.environment.{key}", "not a Loyalist setting (see loyalist/settings.py)")
            else:
                values[field_name] = value
        try:
            settings = Settings.model_validate(values)
        except ValidationError as exc:
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"])
                self.problem(f"{where}.environment.LOYALIST_{loc.upper()}", str(err["msg"]))
            return
        env_where = f"{where}.environment"
        self._reachable(f"{env_where} (kafka)", settings.kafka_host, settings.kafka_port, svc)
        for host in settings.cassandra_contact_points:
            self._reachable(f"{env_where} (cassandra)", host, settings.cassandra_port, svc)
        self._reachable(f"{env_where} (redis)", settings.redis_host, settings.redis_port, svc)
        for infra, host in (("kafka", settings.kafka_host), ("redis", settings.redis_host)):
            if host in LOOPBACK:
                self.problem(env_where, f"{infra} at {host} is the container itself; set LOYALIST_{infra.upper()}_HOST")
        if any(h in LOOPBACK for h in settings.cassandra_contact_points):
            self.problem(env_where, "cassandra at loopback is the container itself; set LOYALIST_CASSANDRA_HOSTS")
        if svc.loyalist_service == "notify":
            self._reachable(f"{env_where} (smtp)", settings.smtp_host, settings.smtp_port, svc)
        for other in SERVICE_NAMES:
            url = urlsplit(settings.service_url(other))
            self._reachable(f"{env_where}.LOYALIST_{other.upper()}_URL", url.hostname or "",
                            url.port or 80, svc)
        name = svc.loyalist_service
        if name is None:
            return
        port = settings.service_port(name)
        if settings.host not in ANY_ADDRESS:
            self.problem(f"{env_where}.LOYALIST_HOST",
                         f"{name} binds {settings.host}, unreachable from other containers; use 0.0.0.0")
        if port not in {p.target for p in svc.ports} | svc.listening_ports():
            self.problem(f"{where}.ports", f"{name} listens on {port} (LOYALIST_{name.upper()}_PORT) but does "
                                           "not publish or expose it")
        test = " ".join(_as_argv(svc.spec.get("healthcheck", {}).get("test")))
        for url_port in re.findall(r"https?://[^/\s:]+:(\d+)", test):
            if int(url_port) != port:
                self.problem(f"{where}.healthcheck", f"probes port {url_port}, the service listens on {port}")
        if not _has_healthcheck(svc):
            self.problem(f"{where}.healthcheck", "a Loyalist service needs a healthcheck on /readyz")
        # Faust agents on a topic that does not exist yet never consume: the topics must exist first.
        if not any(self._is_bootstrap(self.services[d]) and c == "service_completed_successfully"
                   for d, c in self._dependencies(svc).items() if d in self.services):
            self.problem(f"{where}.depends_on", "must wait for the bootstrap one-shot (python -m loyalist.devstack "
                                                "bootstrap, condition service_completed_successfully)")

    @staticmethod
    def _is_bootstrap(svc: Service) -> bool:
        argv = svc.command
        return svc.python_module == "loyalist.devstack" and "bootstrap" in argv

    def _check_kafka(self, svc: Service) -> None:
        where = f"services.{svc.name}.environment"
        env = svc.environment
        cluster_id = env.get("CLUSTER_ID")
        if cluster_id is not None:
            try:
                raw = base64.urlsafe_b64decode(cluster_id + "=" * (-len(cluster_id) % 4))
            except (binascii.Error, ValueError):
                raw = b""
            if len(raw) != 16 or len(cluster_id) != 22:
                self.problem(f"{where}.CLUSTER_ID", "must be a KRaft cluster id: 16 bytes in base64url (22 chars)")
        listeners = _listener_map(env.get("KAFKA_LISTENERS", ""))
        advertised = _listener_map(env.get("KAFKA_ADVERTISED_LISTENERS", ""))
        for name, (_, port) in advertised.items():
            if name not in listeners:
                self.problem(f"{where}.KAFKA_ADVERTISED_LISTENERS", f"{name} is advertised but not a listener")
            elif listeners[name][1] != port:
                self.problem(f"{where}.KAFKA_ADVERTISED_LISTENERS", f"{name} advertises port {port} but listens on "
                                                                    f"{listeners[name][1]}")
        for name, (_, port) in listeners.items():
            if port not in svc.listening_ports() and name not in env.get("KAFKA_CONTROLLER_LISTENER_NAMES", ""):
                self.problem(f"services.{svc.name}", f"listener {name} on {port} is neither published nor exposed")
        # Every Loyalist container must reach Kafka at an advertised address, or the broker redirects it away.
        for client in self.services.values():
            if not client.is_loyalist:
                continue
            try:
                settings = Settings.model_validate({
                    k.removeprefix("LOYALIST_").lower(): v for k, v in client.environment.items()
                    if k.startswith("LOYALIST_") and k.removeprefix("LOYALIST_").lower() in Settings.model_fields
                })
            except ValidationError:
                continue
            address = (settings.kafka_host, settings.kafka_port)
            if settings.kafka_host == svc.name and address not in advertised.values():
                self.problem(f"services.{client.name}.environment",
                             f"connects to {settings.kafka_bootstrap}, which {svc.name} does not advertise")

    # ---- mounted configuration files ---------------------------------------------------------------------
    def _host_path(self, svc: Service, container_path: str) -> Path | None:
        """The repository file behind a container path, through the service's bind mounts."""
        best: Mount | None = None
        for mount in svc.mounts:
            if mount.kind != "bind" or not mount.source:
                continue
            inside = container_path == mount.target or container_path.startswith(mount.target.rstrip("/") + "/")
            if inside and (best is None or len(mount.target) > len(best.target)):
                best = mount
        if best is None or best.source is None:
            return None
        rest = container_path[len(best.target):].lstrip("/")
        return (self.root / best.source / rest).resolve() if rest else (self.root / best.source).resolve()

    def _check_prometheus(self, svc: Service) -> None:
        where = f"services.{svc.name}"
        config_path = "/etc/prometheus/prometheus.yml"
        for arg in svc.command:
            if arg.startswith("--config.file="):
                config_path = arg.split("=", 1)[1]
        host_file = self._host_path(svc, config_path)
        if host_file is None or not host_file.is_file():
            self.problem(where, f"{config_path} is not mounted from a file in the repository")
            return
        try:
            config = yaml.safe_load(host_file.read_text()) or {}
        except yaml.YAMLError as exc:
            self.problem(str(host_file), f"invalid YAML: {exc}")
            return
        rel = host_file.relative_to(self.root)
        jobs = config.get("scrape_configs") or []
        if not jobs:
            self.problem(str(rel), "no scrape_configs")
        for job in jobs:
            for static in job.get("static_configs") or []:
                for target in static.get("targets") or []:
                    host, _, port = str(target).rpartition(":")
                    if not port.isdigit():
                        self.problem(f"{rel} job {job.get('job_name')}", f"target {target!r} has no port")
                        continue
                    self._reachable(f"{rel} job {job.get('job_name')}", host, int(port), svc)
        config_dir = str(PurePosixPath(config_path).parent)
        for pattern in config.get("rule_files") or []:
            container_glob = pattern if pattern.startswith("/") else f"{config_dir}/{pattern}"
            parent = self._host_path(svc, str(PurePosixPath(container_glob).parent))
            files = sorted(parent.glob(PurePosixPath(container_glob).name)) if parent and parent.is_dir() else []
            if not files:
                self.problem(f"{rel} rule_files", f"{pattern} matches no mounted file")
            for rule_file in files:
                try:
                    rules = yaml.safe_load(rule_file.read_text()) or {}
                except yaml.YAMLError as exc:
                    self.problem(str(rule_file.relative_to(self.root)), f"invalid YAML: {exc}")
                    continue
                if not isinstance(rules, dict) or not isinstance(rules.get("groups"), list):
                    self.problem(str(rule_file.relative_to(self.root)), "a rule file needs a 'groups' list")

    def _check_grafana(self, svc: Service) -> None:
        where = f"services.{svc.name}"
        provisioning = svc.environment.get("GF_PATHS_PROVISIONING", "/etc/grafana/provisioning")
        host_dir = self._host_path(svc, provisioning)
        if host_dir is None or not host_dir.is_dir():
            self.problem(where, f"{provisioning} is not mounted from a directory in the repository")
            return
        datasource_uids: set[str] = set()
        for file in sorted((host_dir / "datasources").glob("*.y*ml")):
            doc = yaml.safe_load(file.read_text()) or {}
            for ds in doc.get("datasources") or []:
                if ds.get("uid"):
                    datasource_uids.add(str(ds["uid"]))
                url = urlsplit(str(ds.get("url", "")))
                if url.hostname:
                    self._reachable(f"{file.relative_to(self.root)} datasource {ds.get('name')}", url.hostname,
                                    url.port or 80, svc)
        if not datasource_uids:
            self.problem(f"{where} provisioning", "no datasource with a uid is provisioned")
        providers = [p for file in sorted((host_dir / "dashboards").glob("*.y*ml"))
                     for p in (yaml.safe_load(file.read_text()) or {}).get("providers") or []]
        if not providers:
            self.problem(f"{where} provisioning", "no dashboard provider is provisioned")
        uids: dict[str, Path] = {}
        for provider in providers:
            path = str((provider.get("options") or {}).get("path", ""))
            dash_dir = self._host_path(svc, path)
            if dash_dir is None or not dash_dir.is_dir():
                self.problem(f"{where} provider {provider.get('name')}",
                             f"{path} is not a mounted repository directory")
                continue
            files = sorted(dash_dir.rglob("*.json"))
            if not files:
                self.problem(f"{where} provider {provider.get('name')}", f"{path} holds no dashboard JSON")
            for file in files:
                for problem in check_dashboard(file, datasource_uids):
                    self.problem(str(file.relative_to(self.root)), problem)
                uid = _dashboard_uid(file)
                if uid and uid in uids:
                    self.problem(str(file.relative_to(self.root)), f"uid {uid!r} also used by {uids[uid].name}")
                elif uid:
                    uids[uid] = file
        home = svc.environment.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
        if home:
            home_file = self._host_path(svc, home)
            if home_file is None or not home_file.is_file():
                self.problem(f"{where}.environment.GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH",
                             f"{home} is not a mounted file")


# ---- helpers shared with other checks --------------------------------------------------------------------
def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _has_healthcheck(svc: Service) -> bool:
    check = svc.spec.get("healthcheck")
    if not isinstance(check, dict) or check.get("disable"):
        return False
    test = check.get("test")
    return bool(test) and test != ["NONE"]


def _module_exists(root: Path, module: str) -> bool:
    if not module:
        return False
    path = root.joinpath(*module.split("."))
    return (path / "__main__.py").is_file() or path.with_suffix(".py").is_file()


def _listener_map(text: str) -> dict[str, tuple[str, int]]:
    """``NAME://host:port,...`` to ``{NAME: (host, port)}``."""
    out: dict[str, tuple[str, int]] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, address = part.partition("://")
        host, _, port = address.rpartition(":")
        if port.isdigit():
            out[name] = (host, int(port))
    return out


def _dockerignore_patterns(context: Path) -> list[str]:
    file = context / ".dockerignore"
    if not file.is_file():
        return []
    return [ln.strip() for ln in file.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def _ignored(relpath: str, patterns: Sequence[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        candidates = [pat, pat.removeprefix("**/")] if pat.startswith("**/") else [pat]
        parts = relpath.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(prefix, c) or (c != pat and fnmatch.fnmatchcase(part, c))
               for prefix in prefixes for part in parts for c in candidates):
            ignored = not negate
    return ignored


def _dockerfile_instructions(text: str) -> Iterator[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        yield keyword.upper(), rest.strip()


def check_dockerfile(dockerfile: Path, context: Path) -> list[str]:
    """``FROM`` images pinned, ``COPY``/``ADD`` sources present in the build context and not ignored."""
    problems: list[str] = []
    patterns = _dockerignore_patterns(context)
    stages: set[str] = set()
    for keyword, rest in _dockerfile_instructions(dockerfile.read_text()):
        if keyword == "FROM":
            words = rest.split()
            image = next((w for w in words if not w.startswith("--")), "")
            if image not in stages and image != "scratch" and "$" not in image:
                last = image.rsplit("/", 1)[-1]
                if "@" not in image and (":" not in last or last.endswith(":latest")):
                    problems.append(f"FROM {image}: pin a version tag")
            if "AS" in (w.upper() for w in words):
                stages.add(words[-1])
        elif keyword in {"COPY", "ADD"}:
            words = rest.split()
            if any(w.startswith("--from=") for w in words):
                continue
            args = [w for w in words if not w.startswith("--")]
            if rest.startswith("["):
                args = [str(a) for a in json.loads(rest)]
            for source in args[:-1]:
                if "://" in source:
                    continue
                matches = list(context.glob(source)) if any(c in source for c in "*?[") else [context / source]
                if not any(m.exists() for m in matches):
                    problems.append(f"{keyword} {source}: not in the build context")
                elif _ignored(source.rstrip("/"), patterns):
                    problems.append(f"{keyword} {source}: excluded by .dockerignore")
    return problems


def _dashboard_uid(file: Path) -> str | None:
    try:
        uid = json.loads(file.read_text()).get("uid")
    except (OSError, ValueError):
        return None
    return str(uid) if uid else None


def iter_panels(dashboard: dict[str, Any]) -> Iterable[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard.get("panels") or []:
        yield panel
        yield from panel.get("panels") or []


def check_dashboard(file: Path, datasource_uids: set[str]) -> list[str]:
    """A dashboard JSON parses, has uid/title, and every datasource it names is provisioned or a variable."""
    try:
        dashboard = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        return [f"invalid JSON: {exc}"]
    problems = []
    for key in ("uid", "title"):
        if not dashboard.get(key):
            problems.append(f"missing {key}")
    variables = {str(v.get("name")) for v in (dashboard.get("templating") or {}).get("list") or []}

    def check_ref(ref: Any, where: str) -> None:
        if not isinstance(ref, dict):
            return
        uid = str(ref.get("uid", ""))
        if uid.startswith("$"):
            name = uid.strip("${}")
            if name not in variables:
                problems.append(f"{where}: datasource variable {uid} is not defined")
        elif uid and uid not in datasource_uids and uid != "-- Grafana --" and ref.get("type") != "datasource":
            problems.append(f"{where}: datasource uid {uid!r} is not provisioned")

    for panel in iter_panels(dashboard):
        title = panel.get("title", "?")
        check_ref(panel.get("datasource"), f"panel {title!r}")
        for target in panel.get("targets") or []:
            check_ref(target.get("datasource"), f"panel {title!r}")
            if panel.get("type") != "row" and not target.get("expr"):
                problems.append(f"panel {title!r}: a target without a PromQL expr")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loyalist.checks.compose", description=__doc__.split("\n")[0])
    parser.add_argument("compose_file", type=Path, nargs="?", default=Path("docker-compose.yml"))
    args = parser.parse_args(argv)
    check = ComposeCheck(args.compose_file)
    problems = check.run()
    for problem in problems:
        print(f"{args.compose_file}: {problem}", file=sys.stderr)
    if problems:
        print(f"{args.compose_file}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{args.compose_file}: OK ({len(check.services)} services, "
          f"{sum(len(s.ports) for s in check.services.values())} published ports, "
          f"{len(check.doc.get('volumes') or {})} volumes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
