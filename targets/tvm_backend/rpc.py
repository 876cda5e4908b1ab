"""Timing a compiled model on a device of a TVM RPC device farm (fxopt.measure's ``rpc`` backend).

The farm is TVM's own: a tracker (``python -m tvm.exec.rpc_tracker --host H --port P``) and, on
each device, a server registered under a device key (``python -m tvm.exec.rpc_server --tracker
H:P --key K``). One measurement requests a device of key K from the tracker, uploads the
exported library, loads it in a Relax VM there and times ``main`` with the VM's
``time_evaluator``.

Why the remote session runs in a separate process: TVM's RPC client blocks in C++ socket calls
with no timeout of its own. A server that is killed closes its socket and the call fails, but a
device that hangs, is stopped or drops off the network leaves the call waiting forever, and a
tracker with no free device of the key queues a request forever. So the session runs in a worker
process (this file, run as a script: it imports tvm and numpy only, not torch or fxopt) and the
caller waits for its answer with a deadline; past it the worker is killed, which also closes the
session's socket. A lost device (a broken connection, a timeout) is retried with a new request
to the tracker, which hands out another device of the key when there is one; an error of the
model itself (it does not load, it fails) is not retried. The worker is kept between
measurements (starting one costs the ~6 s of ``import tvm``) and killed when Python exits.

Before each attempt the tracker is asked, over a plain socket with a short timeout, whether any
server of the key is registered: TVM's own tracker client retries a refused connection for 60
s, and waits forever for a key nobody serves.

Quirks of TVM 0.27 that shaped this: the tracker needs the ``tornado``, ``cloudpickle`` and
``psutil`` packages (the client does not); ``vm.time_evaluator("main", ...)`` does not work over
RPC when ``main`` returns a tuple (and fxopt's always do), so inputs are set with ``set_input``
and ``invoke_stateful`` is timed; a server passes ``-timeout`` from the request to its session
process and kills that after it, which frees a device whose client died.
"""

from __future__ import annotations

# Only the standard library at module level: this file is also the worker script.
import atexit
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

__all__ = ["RPCConfig", "tracker_summary", "check_tracker", "time_remote", "shutdown_worker"]

_STARTUP_TIMEOUT_S = 300.0  # importing tvm in a fresh worker, on a loaded machine
_CONNECT_TIMEOUT_S = 10.0
# Words of errors that mean the device or the connection was lost, not the model.
# (A server killed mid-call: "Check failed: (code == RPCCode::kReturn) is false: code=kShutdown".)
_LOST = ("socket", "connection", "connect", "closed", "broken pipe", "reset by peer", "timed out",
         "timeout", "eof", "cannot request", "rpcsessiontimeouterror", "rpc session", "kshutdown")


@dataclass(frozen=True)
class RPCConfig:
    """Where the device farm is and how long to wait for it.

    ``key``: the device key the servers registered with (None: the target's name).
    ``session_timeout_s``: the most one attempt may take, from the request to the tracker to the
    timings, waiting for a free device included; the server also ends the session after it.
    ``retries``: further attempts, each on a device newly requested from the tracker, after a
    device was lost or timed out. ``priority``: the tracker serves higher priorities first.
    """

    tracker_host: str = "127.0.0.1"
    tracker_port: int = 9190
    key: str | None = None
    session_timeout_s: float = 120.0
    retries: int = 1
    priority: int = 1

    def __post_init__(self) -> None:
        from fxopt.errors import InputError

        def bad(field: str, want: str) -> InputError:
            return InputError(f"RPCConfig.{field} must be {want}, got {getattr(self, field)!r}")

        if not isinstance(self.tracker_host, str) or not self.tracker_host:
            raise bad("tracker_host", "a host name or address")
        if not isinstance(self.tracker_port, int) or not 0 < self.tracker_port < 65536:
            raise bad("tracker_port", "a port number (1-65535)")
        if self.key is not None and (not isinstance(self.key, str) or not self.key or ":" in self.key):
            raise bad("key", "a device key without ':' (the key given to rpc_server --key), or None")
        if not isinstance(self.session_timeout_s, (int, float)) or not self.session_timeout_s > 0:
            raise bad("session_timeout_s", "a positive number of seconds")
        if not isinstance(self.retries, int) or self.retries < 0:
            raise bad("retries", "a non-negative int")
        if not isinstance(self.priority, int):
            raise bad("priority", "an int")

    @property
    def tracker(self) -> str:
        return f"{self.tracker_host}:{self.tracker_port}"


# --------------------------------------------------------------------------------------------
# The tracker, asked directly


def tracker_summary(host: str, port: int, timeout: float = _CONNECT_TIMEOUT_S) -> dict:
    """The tracker's summary (``{"server_info": [...], "queue_info": {...}}``); OSError when it
    does not answer within ``timeout`` seconds, RuntimeError when it is not a TVM tracker."""
    from tvm.rpc import base

    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        magic = struct.unpack("<i", base.recvall(sock, 4))[0]
        if magic != base.RPC_TRACKER_MAGIC:
            raise RuntimeError(f"{host}:{port} answers, but is not a TVM RPC tracker")
        base.sendjson(sock, [base.TrackerCode.SUMMARY])
        reply = base.recvjson(sock)
    if not isinstance(reply, list) or len(reply) != 2 or reply[0] != base.TrackerCode.SUCCESS:
        raise RuntimeError(f"the tracker at {host}:{port} answered {reply!r} to a summary request")
    return reply[1]


def check_tracker(config: RPCConfig, key: str) -> int:
    """The number of servers registered under ``key``; MeasureError saying what to start when
    the tracker does not answer or no server has that key."""
    from fxopt.errors import MeasureError

    try:
        summary = tracker_summary(config.tracker_host, config.tracker_port)
    except (OSError, RuntimeError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise MeasureError(
            f"the RPC tracker at {config.tracker} does not answer ({reason}); start one "
            f"(`python -m tvm.exec.rpc_tracker --host {config.tracker_host} --port {config.tracker_port}`) "
            "or give rpc=RPCConfig(tracker_host=..., tracker_port=...) of a running tracker"
        ) from exc
    servers = [s for s in summary.get("server_info", []) if s.get("key") == f"server:{key}"]
    if not servers:
        keys = sorted({str(s.get("key", "")).removeprefix("server:") for s in summary.get("server_info", [])})
        raise MeasureError(
            f"no RPC server is registered under key {key!r} at the tracker {config.tracker} "
            f"(keys there: {', '.join(keys) or 'none'}); start one on the device "
            f"(`python -m tvm.exec.rpc_server --tracker {config.tracker} --key {key}`) or set "
            "RPCConfig(key=...) to a key the tracker has"
        )
    return len(servers)


# --------------------------------------------------------------------------------------------
# The worker process, seen from the caller


class _Timeout(Exception):
    pass


class _Died(Exception):
    pass


_BOOT = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__fxopt_rpc_worker__')"


class _Worker:
    """A child Python running this file: one JSON request per line in, one JSON reply out."""

    def __init__(self) -> None:
        self._log = tempfile.TemporaryFile()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        # Its own session: killing it takes anything it started along.
        self.proc = subprocess.Popen([sys.executable, "-c", _BOOT, str(Path(__file__).resolve())],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     env=env, start_new_session=True)
        self._buffer = b""
        try:
            reply = self._read(time.monotonic() + _STARTUP_TIMEOUT_S)
            if reply.get("ready") is not True:
                raise _Died(f"unexpected first line {reply!r}")
        except BaseException:
            self.kill()
            raise

    def call(self, request: dict, timeout: float) -> dict:
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise _Died(f"cannot write to it: {exc}") from exc
        return self._read(time.monotonic() + timeout)

    def _read(self, deadline: float) -> dict:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Timeout()
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                self.proc.wait(timeout=5)
                raise _Died(f"exit status {self.proc.returncode}; {self.log_tail()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def log_tail(self, limit: int = 400) -> str:
        try:
            self._log.seek(0)
            lines = [ln for ln in self._log.read().decode(errors="replace").splitlines() if ln.strip()]
        except (OSError, ValueError):
            return "no log"
        text = " | ".join(lines[-3:])
        return text[-limit:] if text else "no output"

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not wait
            pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self._log.close()


_worker: _Worker | None = None
_worker_lock = threading.Lock()


def shutdown_worker() -> None:
    """Kill the measurement worker process, if one runs (also done when Python exits)."""
    global _worker
    if _worker is not None:
        _worker.kill()
        _worker = None


atexit.register(shutdown_worker)


def _grace(session_timeout_s: float) -> float:
    """Waited beyond the session timeout, so that the server's own timeout error (a clearer
    message, and the device is freed) arrives before the worker is killed."""
    return min(10.0, 1.0 + 0.25 * session_timeout_s)


def _lost(message: str) -> bool:
    text = message.lower()
    return any(word in text for word in _LOST)


def time_remote(library: Path, inputs: Sequence[Any], *, config: RPCConfig, key: str, device: str,
                repeat: int, number: int, warmup: int, threads: int | None) -> tuple[list[float], list[str]]:
    """Seconds per run of the exported ``library`` on a device of ``key``: (samples, notes).

    ``device`` is the TVM device type on the device ("cpu", "cuda", "opencl"...). ``threads``
    sets the size of the device's thread pool (``runtime.config_threadpool``; it can shrink the
    pool the server started with, not grow it: start the server with ``TVM_NUM_THREADS``), None
    leaves it. ``notes`` say which attempts were lost and why. Raises MeasureError when every
    attempt failed, or at once when the model itself fails on the device.
    """
    import numpy as np

    from fxopt.errors import MeasureError

    global _worker
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fxopt-rpc-") as scratch:
        paths = []
        for i, array in enumerate(inputs):
            paths.append(str(Path(scratch) / f"input_{i}.npy"))
            np.save(paths[-1], np.ascontiguousarray(array))
        request = {"tracker_host": config.tracker_host, "tracker_port": config.tracker_port,
                   "key": key, "priority": config.priority, "session_timeout_s": config.session_timeout_s,
                   "library": str(Path(library).resolve()), "inputs": paths, "device": device,
                   "repeat": repeat, "number": number, "warmup": warmup, "threads": threads}
        attempts = 1 + config.retries
        with _worker_lock:
            for attempt in range(1, attempts + 1):
                check_tracker(config, key)
                try:
                    if _worker is None:
                        _worker = _Worker()
                    reply = _worker.call(request, config.session_timeout_s + _grace(config.session_timeout_s))
                except _Timeout:
                    if _worker is None:  # did not even start
                        raise MeasureError(f"the RPC measurement process did not start in "
                                           f"{_STARTUP_TIMEOUT_S:g} s (`import tvm` hangs?)") from None
                    notes.append(f"attempt {attempt}: no result in {config.session_timeout_s:g} s "
                                 "(a hung device, or none free); session killed")
                    shutdown_worker()
                    continue
                except (_Died, OSError, ValueError) as exc:
                    notes.append(f"attempt {attempt}: the measurement process died ({exc})")
                    shutdown_worker()
                    continue
                if reply.get("ok"):
                    return [float(s) for s in reply["samples"]], notes
                message = f"{reply.get('stage', '?')}: {reply.get('message', '?')}"
                if reply.get("stage") == "request" or _lost(message):
                    notes.append(f"attempt {attempt}: device lost during {message}")
                    continue
                raise MeasureError(f"the model failed on the RPC device of key {key!r} "
                                   f"(tracker {config.tracker}) during {message}")
    raise MeasureError(
        f"measuring on RPC key {key!r} (tracker {config.tracker}) failed {attempts} time(s): "
        f"{'; '.join(notes)}. Check the devices (`python -m tvm.exec.query_rpc_tracker --host "
        f"{config.tracker_host} --port {config.tracker_port}`), or raise RPCConfig(retries=..., "
        "session_timeout_s=...)"
    )


# --------------------------------------------------------------------------------------------
# The worker process, inside


def _one_line(exc: BaseException, limit: int = 500) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # TVM errors carry a C++/Python trace first and the message last.
    text = lines[-1] if lines else type(exc).__name__
    text = f"{type(exc).__name__}: {text}" if type(exc).__name__ not in text else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _serve(request: dict) -> dict:
    import numpy as np
    import tvm
    from tvm import relax, rpc

    stage = "request"
    try:
        tracker = rpc.connect_tracker(request["tracker_host"], request["tracker_port"])
        try:
            remote = tracker.request(request["key"], priority=request["priority"],
                                     session_timeout=request["session_timeout_s"], max_retry=1)
        finally:
            tracker.close()
        stage = "upload"
        library = Path(request["library"])
        remote.upload(str(library))
        stage = "load"
        module = remote.load_module(library.name)
        dev = remote.device(request["device"], 0)
        if request["threads"]:
            remote.get_function("runtime.config_threadpool")(1, int(request["threads"]))
        vm = relax.VirtualMachine(module, dev)
        args = [tvm.runtime.tensor(np.load(path, allow_pickle=False), dev) for path in request["inputs"]]
        vm.set_input("main", *args)
        stage = "run"
        if request["warmup"]:
            vm.time_evaluator("invoke_stateful", dev, number=1, repeat=request["warmup"])("main")
        result = vm.time_evaluator("invoke_stateful", dev, number=request["number"],
                                   repeat=request["repeat"])("main")
        return {"ok": True, "samples": [float(r) for r in result.results]}
    except Exception as exc:  # noqa: BLE001 - everything goes back to the caller
        return {"ok": False, "stage": stage, "message": _one_line(exc)}


def _worker_main() -> None:
    # The replies go to the real stdout; anything TVM prints goes to stderr (the caller's log).
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    parent = os.getppid()

    def orphaned() -> None:  # the caller died without killing this process: end it
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=orphaned, daemon=True).start()
    import tvm  # noqa: F401 - the slow part, before saying ready
    from tvm import relax, rpc  # noqa: F401

    replies.write(json.dumps({"ready": True}) + "\n")
    replies.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        reply = _serve(json.loads(line))
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__fxopt_rpc_worker__":
    _worker_main()
