"""The local stack without Docker: Kafka and Cassandra from Maven Central jars on the installed Java,
Redis and Prometheus from Debian packages, an SMTP sink, and the five services — each a plain process
with a pid file and a log under ``.loyalist/``.

``python -m loyalist.devstack up|down|status [component ...]`` (what ``make up`` / ``make down`` run).
Starting is idempotent: a component already running (ours, by pid file, or anyone's answering on its
port) is reused. Readiness is checked with real clients. ``down`` stops exactly what ``up`` started,
by pid.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loyalist.settings import SERVICE_NAMES, Settings

REPO = Path(__file__).resolve().parent.parent
LOCAL = REPO / "deploy" / "local"

INFRA = ("kafka", "cassandra", "redis", "prometheus", "smtp")
EXPORTERS = ("lag",)
ALL = (*INFRA, *SERVICE_NAMES, *EXPORTERS)


class StackError(RuntimeError):
    """A component could not start; the message names it and its log."""


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    # A zombie (exited, not yet reaped) is not alive.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


pid_alive = _pid_alive  # public name for other tools (bench)


@dataclass
class Component:
    name: str
    port: int
    command: Callable[[], list[str]]
    ready: Callable[[], bool]
    start_timeout_s: float = 60
    prepare: Callable[[], None] = lambda: None
    env: dict[str, str] = field(default_factory=dict)


TIMER_SLACK = Path("/proc/self/timerslack_ns")


def with_timer_slack(command: list[str], slack_us: int) -> list[str]:
    """``command`` run with a timer slack of ``slack_us`` microseconds for all of its threads (inherited by every
    thread it creates; kept across ``exec``, so the pid stays the command's). A shell sets its own slack, then
    ``exec``s the command; where the kernel has no per-thread slack (``/proc/self/timerslack_ns``), the command
    runs as it is.

    >>> with_timer_slack(["java", "-version"], 0)
    ['java', '-version']
    """
    if slack_us <= 0 or not TIMER_SLACK.exists():
        return command
    script = f'echo {slack_us * 1000} 2>/dev/null > {TIMER_SLACK}; exec "$@"'
    return ["/bin/sh", "-c", script, "sh", *command]


class Stack:
    def __init__(self, settings: Settings, *, quiet: bool = False) -> None:
        self.s = settings
        self.home = settings.state_dir
        self.run_dir = self.home / "run"
        self.log_dir = self.home / "logs"
        self.quiet = quiet
        self.components = {c.name: c for c in self._components()}

    # ---- helpers -------------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)

    def pid_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def pid_of(self, name: str) -> int | None:
        try:
            pid = int(self.pid_file(name).read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _pid_alive(pid) else None

    def _java(self) -> str:
        java = shutil.which("java")
        if not java:
            raise StackError("java is not installed (OpenJDK 17 is expected on this machine)")
        return java

    def jars(self, component: str) -> Path:
        """Runtime jars for a Maven-pinned server, copied once into .loyalist/jars (cached by pom hash)."""
        pom = LOCAL / "maven" / component / "pom.xml"
        digest = hashlib.sha256(pom.read_bytes()).hexdigest()[:16]
        target = (self.s.jars_dir or self.home / "jars") / component
        marker = target / f".pom-{digest}"
        if marker.exists():
            return target
        mvn = shutil.which("mvn")
        if not mvn:
            raise StackError("mvn is not installed; it fetches Kafka and Cassandra from Maven Central")
        self.say(f"  fetching {component} jars from Maven Central (cached in ~/.m2) ...")
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        started = time.monotonic()
        proc = subprocess.run(
            [mvn, "-B", "-q", "-f", str(pom),
             "org.apache.maven.plugins:maven-dependency-plugin:3.6.1:copy-dependencies",
             "-DincludeScope=runtime", f"-DoutputDirectory={target}"],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise StackError(f"maven could not fetch {component}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        marker.write_text(pom.read_text())
        self.say(f"  {component}: {len(list(target.glob('*.jar')))} jars in {time.monotonic() - started:.0f}s")
        return target

    # ---- components -----------------------------------------------------------------------------
    def _components(self) -> list[Component]:
        s = self.s
        py = sys.executable
        comps = [
            Component("kafka", s.kafka_port, self._kafka_cmd, self._kafka_ready, 90, self._kafka_prepare),
            Component("cassandra", s.cassandra_port, self._cassandra_cmd, self._cassandra_ready, 180,
                      self._cassandra_prepare),
            Component("redis", s.redis_port, self._redis_cmd, self._redis_ready, 20),
            Component("prometheus", s.prometheus_port, self._prometheus_cmd, self._prometheus_ready, 30,
                      self._prometheus_prepare),
            Component("smtp", s.smtp_port, lambda: [py, "-m", "loyalist.smtp_sink"],
                      lambda: _port_open(s.smtp_port) and _port_open(s.smtp_sink_http_port), 20,
                      env={"LOYALIST_SMTP_PORT": str(s.smtp_port),
                           "LOYALIST_SMTP_SINK_HTTP_PORT": str(s.smtp_sink_http_port)}),
        ]
        for name in SERVICE_NAMES:
            port = s.service_port(name)
            comps.append(Component(name, port, self._service_cmd(name), self._service_ready(port), 90,
                                   env=self._service_env(name)))
        lag_port = s.lag_exporter_port
        comps.append(Component(
            "lag", lag_port, lambda: [py, "-m", "loyalist.checks.lag", "--port", str(lag_port)],
            lambda: self._http_ready(lag_port, "/metrics"), 30,
        ))
        return comps

    @staticmethod
    def _service_env(name: str) -> dict[str, str]:
        # The local stack runs the shipped example loyalty program so the demo has a ledger to show.
        if name == "profile":
            key = "LOYALIST_LOYALTY_BOOTSTRAP_PROGRAM"
            return {key: os.environ.get(key, "example")}
        return {}

    @staticmethod
    def _service_cmd(name: str) -> Callable[[], list[str]]:
        return lambda: [sys.executable, "-m", f"services.{name}"]

    def _service_ready(self, port: int) -> Callable[[], bool]:
        return lambda: self._http_ready(port)

    def _kafka_prepare(self) -> None:
        data = self.home / "kafka" / "data"
        data.mkdir(parents=True, exist_ok=True)
        props = (LOCAL / "kafka" / "server.properties.tmpl").read_text().format(
            port=self.s.kafka_port, controller_port=self.s.kafka_controller_port, data_dir=data
        )
        conf = self.home / "kafka" / "server.properties"
        conf.write_text(props)
        if not (data / "meta.properties").exists():
            cluster_id = "-"
            # Kafka's own Uuid.randomUuid() skips ids starting with "-": the CLI would read one as an option
            # (about 1 in 64 random ids; it failed a CI run).
            while cluster_id.startswith("-"):
                cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            proc = subprocess.run(
                [self._java(), "-Xmx256m", f"-Dlog4j.configuration=file:{LOCAL / 'kafka' / 'log4j.properties'}",
                 "-cp", f"{self.jars('kafka')}/*", "kafka.tools.StorageTool", "format",
                 "-t", cluster_id, "-c", str(conf), "--ignore-formatted"],
                capture_output=True, text=True,
            )
            if proc.returncode != 0:
                raise StackError(f"kafka storage format failed: {proc.stderr[-2000:]}")

    def _kafka_cmd(self) -> list[str]:
        tmp = self.home / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return [
            self._java(), "-Xms512m", "-Xmx768m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{LOCAL / 'kafka' / 'log4j.properties'}",
            f"-DZstdTempFolder={tmp}", f"-Dorg.xerial.snappy.tempdir={tmp}",
            "-cp", f"{self.jars('kafka')}/*", "kafka.Kafka", str(self.home / "kafka" / "server.properties"),
        ]

    def _kafka_ready(self) -> bool:
        from loyalist.kafka import kafka_ready

        return _port_open(self.s.kafka_port) and asyncio.run(kafka_ready(self.s))

    def _cassandra_prepare(self) -> None:
        data = self.home / "cassandra"
        for sub in ("data", "commitlog", "hints", "saved_caches", "cdc_raw", "logs"):
            (data / sub).mkdir(parents=True, exist_ok=True)
        commitlog_sync = ("commitlog_sync: batch" if self.s.cassandra_commitlog_sync == "batch"
                          else "commitlog_sync: periodic\ncommitlog_sync_period: 10000ms")
        yaml = (LOCAL / "cassandra" / "cassandra.yaml.tmpl").read_text().format(
            storage_port=self.s.cassandra_storage_port, native_port=self.s.cassandra_port, data_dir=data,
            commitlog_sync=commitlog_sync,
        )
        (data / "cassandra.yaml").write_text(yaml)

    def _cassandra_cmd(self) -> list[str]:
        jars = self.jars("cassandra")
        jamm = sorted(jars.glob("jamm-*.jar"))
        flags = [
            ln.strip() for ln in (LOCAL / "cassandra" / "jvm17.options").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")
        ]
        data = self.home / "cassandra"
        return with_timer_slack([
            self._java(), f"-Xms{self.s.cassandra_heap}", f"-Xmx{self.s.cassandra_heap}", "-Xss512k", *flags,
            *([f"-javaagent:{jamm[0]}"] if jamm else []),
            f"-Dcassandra.config=file://{data / 'cassandra.yaml'}",
            "-Dcassandra-foreground=yes",
            f"-Dcassandra.storagedir={data}",
            f"-Dcassandra.logdir={data / 'logs'}",
            f"-Dlogback.configurationFile={LOCAL / 'cassandra' / 'logback.xml'}",
            f"-Dcassandra.jmx.local.port={self.s.cassandra_jmx_port}",
            "-Dcassandra.skip_wait_for_gossip_to_settle=0",
            "-Dcassandra.ring_delay_ms=100",
            "-cp", f"{jars}/*", "org.apache.cassandra.service.CassandraDaemon",
        ], self.s.cassandra_timer_slack_us)

    def _cassandra_ready(self) -> bool:
        from loyalist.cassandra import cassandra_ready

        return _port_open(self.s.cassandra_port) and cassandra_ready(self.s)

    def _redis_cmd(self) -> list[str]:
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        data = self.home / "redis"
        data.mkdir(parents=True, exist_ok=True)
        return [exe, "--bind", "127.0.0.1", "--port", str(self.s.redis_port), "--dir", str(data),
                # AOF (fsync every second) only: an RDB snapshot forks and copies the whole dataset every minute
                # under load, which costs a core for seconds on a small machine.
                "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
                "--daemonize", "no", "--protected-mode", "yes"]

    def _redis_ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.s.redis_port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def _prometheus_prepare(self) -> None:
        src = REPO / "deploy" / "prometheus" / "prometheus.yml"
        conf_dir = self.home / "prometheus"
        (conf_dir / "data").mkdir(parents=True, exist_ok=True)
        text = src.read_text()
        # Local ports can be overridden by env; the repo's scrape config names the defaults.
        for svc in SERVICE_NAMES:
            default = Settings.model_fields[f"{svc}_port"].default
            text = text.replace(f"127.0.0.1:{default}", f"127.0.0.1:{self.s.service_port(svc)}")
        text = text.replace("127.0.0.1:8009", f"127.0.0.1:{self.s.lag_exporter_port}")
        (conf_dir / "prometheus.yml").write_text(text)
        rules = REPO / "deploy" / "prometheus" / "rules"
        if rules.exists():
            shutil.copytree(rules, conf_dir / "rules", dirs_exist_ok=True)

    def _prometheus_cmd(self) -> list[str]:
        exe = shutil.which("prometheus") or "/usr/bin/prometheus"
        conf_dir = self.home / "prometheus"
        return [exe, f"--config.file={conf_dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={conf_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.s.prometheus_port}",
                "--web.enable-lifecycle", "--storage.tsdb.retention.time=2d"]

    def _prometheus_ready(self) -> bool:
        return self._http_ready(self.s.prometheus_port, "/-/ready")

    def _http_ready(self, port: int, path: str = "/readyz") -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
                return bool(resp.status == 200)
        except Exception:
            return False

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self, name: str) -> str:
        comp = self.components[name]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        pid = self.pid_of(name)
        if pid is None and comp.ready():
            return "reused (already answering on its port, not started by this stack)"
        if pid is not None:
            return f"reused (pid {pid})"
        if _port_open(comp.port):
            raise StackError(
                f"{name}: port {comp.port} is taken by another process that does not answer as {name}; "
                f"free it or set LOYALIST_{name.upper()}_PORT"
            )
        comp.prepare()
        log = self.log_file(name).open("ab")
        env = {**os.environ, **comp.env, "LOYALIST_HOME": str(self.home), "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(
            comp.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=REPO, env=env, start_new_session=True,
        )
        self.pid_file(name).write_text(str(proc.pid))
        return f"started (pid {proc.pid})"

    def wait_ready(self, name: str) -> float:
        comp = self.components[name]
        started = time.monotonic()
        while time.monotonic() - started < comp.start_timeout_s:
            pid_file_exists = self.pid_file(name).exists()
            if pid_file_exists and self.pid_of(name) is None and not comp.ready():
                raise StackError(f"{name} exited during start; see its log: {self.log_file(name)}\n"
                                 + self.tail_log(name))
            if comp.ready():
                return time.monotonic() - started
            time.sleep(0.5)
        raise StackError(f"{name} was not ready after {comp.start_timeout_s:.0f}s; see its log: "
                         f"{self.log_file(name)}\n" + self.tail_log(name))

    def tail_log(self, name: str, lines: int = 15) -> str:
        try:
            text = self.log_file(name).read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\n".join("    " + ln for ln in text)

    def up(self, names: Sequence[str], *, bootstrap_namespace: bool = True) -> float:
        """Start infra first (the JVMs in parallel), bootstrap topics and keyspace, then the services."""
        t0 = time.monotonic()
        waves = [[n for n in names if n in INFRA], [n for n in names if n in SERVICE_NAMES],
                 [n for n in names if n in EXPORTERS]]
        for wave in waves:
            for name in wave:
                self.say(f"{name:<11} {self.start(name)}")
            for name in wave:
                took = self.wait_ready(name)
                self.say(f"{name:<11} ready ({took:.1f}s) on 127.0.0.1:{self.components[name].port}")
            if bootstrap_namespace and wave is waves[0] and ({"kafka", "cassandra"} <= set(wave) or waves[1]):
                bootstrap(self.s, dev_credentials=True)
                self.say("bootstrap   topics, Cassandra migrations and dev credentials in place")
        return time.monotonic() - t0

    def down(self, names: Sequence[str]) -> None:
        for name in reversed(list(names)):
            pid = self.pid_of(name)
            if pid is None:
                self.pid_file(name).unlink(missing_ok=True)
                continue
            self.say(f"{name:<11} stopping pid {pid}")
            self.stop_pid(pid)
            self.pid_file(name).unlink(missing_ok=True)

    @staticmethod
    def stop_pid(pid: int, timeout_s: float = 30) -> None:
        try:
            os.killpg(pid, signal.SIGTERM)
        except OSError:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _pid_alive(pid):
            time.sleep(0.2)
        if _pid_alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass

    def kill9(self, name: str) -> None:
        """Hard-kill a component (fault-injection tests)."""
        pid = self.pid_of(name)
        if pid is not None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                os.kill(pid, signal.SIGKILL)
            while _pid_alive(pid):
                time.sleep(0.05)

    def status(self, names: Sequence[str]) -> list[tuple[str, str]]:
        out = []
        for name in names:
            pid = self.pid_of(name)
            ready = self.components[name].ready()
            state = ("ready" if ready else "not ready") + (f" (pid {pid})" if pid else " (not ours)" if ready else "")
            out.append((name, state))
        return out


def bootstrap(settings: Settings, *, dev_credentials: bool = False) -> None:
    """Create this namespace's topics and Cassandra keyspace (idempotent)."""
    from loyalist.cassandra import connect, migrate
    from loyalist.kafka import ensure_topics

    asyncio.run(ensure_topics(settings))
    cluster, session = connect(settings)
    try:
        migrate(settings, session)
        if dev_credentials:
            from loyalist.auth import ensure_dev_credentials

            ensure_dev_credentials(settings, session)
    finally:
        cluster.shutdown()


def _resolve(names: Sequence[str]) -> list[str]:
    if not names or names == ["all"]:
        return list(ALL)
    if names == ["infra"]:
        return list(INFRA)
    if names == ["services"]:
        return list(SERVICE_NAMES)
    unknown = [n for n in names if n not in ALL]
    if unknown:
        raise SystemExit(f"unknown component(s): {unknown}; choose from {', '.join(ALL)}, infra, services, all")
    return [n for n in ALL if n in names]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loyalist.devstack", description=__doc__)
    parser.add_argument("action", choices=["up", "down", "status", "bootstrap"])
    parser.add_argument("components", nargs="*")
    args = parser.parse_args(argv)
    settings = Settings()
    stack = Stack(settings)
    names = _resolve(args.components)
    try:
        if args.action == "up":
            took = stack.up(names)
            print(f"ready: {len(names)} processes in {took:.1f}s (state and logs in {stack.home})")
        elif args.action == "down":
            stack.down(names)
            print("stopped")
        elif args.action == "bootstrap":
            bootstrap(settings, dev_credentials=True)
            print("bootstrapped")
        else:
            for name, state in stack.status(names):
                print(f"{name:<11} {state}")
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
