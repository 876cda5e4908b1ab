"""fxopt.measure's rpc backend against a real TVM device farm on loopback: a tracker and two
servers (subprocesses on free ports), the host target. A server killed in the middle of a
measurement is retried on the other one; a server that hangs costs a bounded time and a clean
error. Every subprocess is in its own process group and killed with it when the module ends."""

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from fxopt.errors import FxoptError, MeasureError
from fxopt.measure import RPCConfig, measure

_MISSING = [m for m in ("tornado", "cloudpickle", "psutil") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(
    bool(_MISSING), reason=f"TVM's RPC tracker needs {', '.join(_MISSING)} (pip install {' '.join(_MISSING)})")

KEY = "fxopt-loopback"
STARTUP_S = 120  # two tvm imports per server on two busy cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _descendants(pid: int) -> list[int]:
    tree, found, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Farm:
    """A tracker and its servers on 127.0.0.1, each a process group of its own."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.port = _free_port()
        self.servers: list[subprocess.Popen] = []
        self._procs: list[subprocess.Popen] = []
        self.tracker = self._spawn("tracker", ["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port",
                                               str(self.port), "--port-end", str(self.port + 1), "--silent"])

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.directory / f"{name}.log", "wb")
        env = {**os.environ, "TVM_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        log.close()
        self._procs.append(proc)
        return proc

    def add_server(self) -> subprocess.Popen:
        port = _free_port()
        server = self._spawn(f"server{len(self.servers)}", [
            "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1),
            "--tracker", f"127.0.0.1:{self.port}", "--key", KEY, "--silent"])
        self.servers.append(server)
        return server

    def registered(self) -> int:
        from fxopt.targets.tvm_backend.rpc import tracker_summary

        try:
            summary = tracker_summary("127.0.0.1", self.port, timeout=2)
        except (OSError, RuntimeError, ValueError):
            return -1
        return sum(1 for s in summary["server_info"] if s["key"] == f"server:{KEY}")

    def wait(self, condition, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                logs = {p.name: p.read_text(errors="replace")[-500:] for p in self.directory.glob("*.log")}
                pytest.fail(f"RPC farm: {what} not within {timeout} s; logs: {logs}")
            time.sleep(0.2)

    def alive_servers(self) -> list[subprocess.Popen]:
        return [s for s in self.servers if s.poll() is None]

    def close(self) -> None:
        for proc in self._procs:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    farm = Farm(tmp_path_factory.mktemp("rpc-farm"))
    try:
        farm.wait(lambda: farm.registered() >= 0, "the tracker answering", STARTUP_S)
        farm.add_server()
        farm.add_server()
        farm.wait(lambda: farm.registered() == 2, "two servers registering", STARTUP_S)
        yield farm
    finally:
        from fxopt.targets.tvm_backend import rpc

        rpc.shutdown_worker()
        farm.close()


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()


def config(farm, **changes):
    return RPCConfig(tracker_host="127.0.0.1", tracker_port=farm.port, key=KEY, **changes)


def test_round_trip_on_loopback_and_cache(farm, tmp_path):
    x = torch.randn(1, 3, 32, 32)
    first = measure(small_net(), (x,), "host", rpc=config(farm), repeat=5, warmup=1, cache_dir=tmp_path)
    assert (first.backend, first.unit, first.target, first.cached) == ("rpc", "s", "host", False)
    assert len(first.samples) == 5 and 0 < first.value < 1.0
    assert first.settings["device_key"] == KEY
    again = measure(small_net(), (x,), "host", backend="rpc", rpc=config(farm), repeat=5, warmup=1,
                    cache_dir=tmp_path)
    assert again.cached and again.value == first.value and again.key == first.key


def test_unknown_device_key_is_a_clean_error(farm):
    with pytest.raises(MeasureError, match=r"no RPC server is registered under key 'no-such-board'.*rpc_server"):
        measure(small_net(), (torch.randn(1, 3, 8, 8),), "host", rpc=RPCConfig(tracker_port=farm.port,
                                                                              key="no-such-board"), cache=False)


def test_server_killed_mid_measurement_is_retried(farm):
    """The server running the session dies (its whole process group): the measurement goes on
    on the other server, or fails cleanly; never a hang."""
    started = time.monotonic()
    outcome = {}

    def run():
        try:  # 3000 runs of ~1 ms here: the session outlives the kill on a much faster machine too
            outcome["result"] = measure(small_net(), (torch.randn(1, 3, 128, 128),), "host", repeat=30,
                                        number=100, warmup=0, cache=False,
                                        rpc=config(farm, retries=2, session_timeout_s=40))
        except FxoptError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    victim = None
    deadline = time.monotonic() + 50
    while victim is None and thread.is_alive() and time.monotonic() < deadline:
        # A server with a session has two processes below it: its listener and the session.
        victim = next((s for s in farm.alive_servers() if len(_descendants(s.pid)) >= 2), None)
        time.sleep(0.02)
    assert victim is not None, f"no server ever got the session: {outcome}"
    time.sleep(0.5)  # into the session: upload and load take ~0.3 s here, then the timed runs
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    thread.join(timeout=max(1.0, 60 - (time.monotonic() - started)))
    assert not thread.is_alive(), "the measurement hangs after its server was killed"
    assert time.monotonic() - started < 60
    # With a second server the attempt is retried there, and the result says so.
    assert "result" in outcome, outcome
    result = outcome["result"]
    assert result.backend == "rpc" and len(result.samples) == 30 and result.value > 0
    assert any("device lost" in note for note in result.notes), result.notes


def test_hung_server_times_out_cleanly(farm):
    """Every server stops answering (SIGSTOP: the kernel still accepts connections): one attempt
    costs the session timeout plus a little, then a one-line error saying what to check."""
    stopped = farm.alive_servers()
    assert stopped
    for server in stopped:
        os.killpg(server.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(MeasureError, match=r"no result in 3 s.*query_rpc_tracker") as info:
            measure(small_net(), (torch.randn(1, 3, 8, 8),), "host", repeat=2, cache=False,
                    rpc=config(farm, retries=0, session_timeout_s=3))
        assert time.monotonic() - started < 30
        assert "\n" not in str(info.value)
    finally:
        for server in stopped:
            os.killpg(server.pid, signal.SIGCONT)
