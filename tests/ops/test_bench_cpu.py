"""The bench's CPU accounting (``bench.procs.CpuMeter``) against real processes: a process that burns a known
amount of CPU time is charged that time, a sleeping one nothing, and the report names who used the cores."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from bench.procs import CpuMeter, cpu_seconds, machine_ticks
from bench.run import render_cpu

# Spins until it has used 0.6 s of CPU time (not wall time: a busy machine only makes it take longer), says so,
# then sleeps until killed, so its pid is still there when the meter stops.
BURNER = """
import sys, time
while time.process_time() < 0.6:
    pass
print("done", flush=True)
time.sleep(600)
"""


@pytest.fixture
def burner() -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", BURNER], stdout=subprocess.PIPE, text=True)
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(600)"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"  # past interpreter start-up
    yield proc
    proc.kill()
    proc.wait()


def test_the_meter_charges_each_process_the_cpu_time_it_used(burner: subprocess.Popen[str],
                                                             sleeper: subprocess.Popen[str]) -> None:
    meter = CpuMeter({"burner": burner.pid, "sleeper": sleeper.pid, "gone": 2**22 + 12345})
    before = cpu_seconds(burner.pid)
    assert before is not None
    meter.start()
    assert burner.stdout is not None and burner.stdout.readline().strip() == "done"
    report = meter.stop()
    used = report["pct_of_a_core"]["burner"] / 100 * report["seconds"]  # type: ignore[index]
    # what it burned after start() (interpreter start-up before it is not counted), to within rounding
    assert 0.6 - before - 0.15 <= used <= 0.6 + 0.15
    assert report["pct_of_a_core"]["sleeper"] <= 1.0  # type: ignore[index]
    assert "gone" not in report["pct_of_a_core"]  # type: ignore[operator]
    assert 0 < report["machine_busy_pct"] <= 100  # type: ignore[operator]
    assert next(iter(report["pct_of_a_core"])) == "burner"  # type: ignore[call-overload]


def test_machine_ticks_only_grow() -> None:
    busy, total = machine_ticks()
    assert 0 <= busy <= total
    busy2, total2 = machine_ticks()
    assert busy2 >= busy and total2 >= total


def test_the_report_names_the_busiest_processes_of_each_run() -> None:
    cpu = {"seconds": 30.0, "cores": 2, "machine_busy_pct": 93.5,
           "pct_of_a_core": {"cassandra": 88.0, "profile fold": 61.2, "kafka": 12.0}}
    text = render_cpu({"stress_mix": {"cpu": cpu}, "funnel": {}}, top=2)
    assert "stress mix, whole pipeline" in text
    assert "93.5% of 2 cores busy" in text
    assert "cassandra 88, profile fold 61" in text and "kafka" not in text
    assert "funnel" not in text
    assert render_cpu({}) == ""


def test_a_child_that_ended_is_counted_with_its_parent_only_when_asked() -> None:
    # The load generator runs as a child process of the bench: its CPU time joins the bench's once reaped.
    me = os.getpid()
    alone, with_children = cpu_seconds(me), cpu_seconds(me, reaped_children=True)
    assert alone is not None and with_children is not None
    subprocess.run([sys.executable, "-c", "import time\nwhile time.process_time() < 0.5: pass"], check=True)
    alone2, with_children2 = cpu_seconds(me), cpu_seconds(me, reaped_children=True)
    assert alone2 is not None and with_children2 is not None
    assert with_children2 - with_children >= 0.5 - 0.05
    assert alone2 - alone < 0.3  # this test's own work only, not the child's half second
