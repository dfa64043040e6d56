"""`command`: any RKV API v1 server, started from the command line in `RKV_COMMAND`.

Everything but starting and stopping the server is pytest-rkv's `RkvHttpDriver`: the
runtime speaks RKV API v1 natively, so there is nothing to translate.
"""

from __future__ import annotations

import os
import shlex
import socket

from pytest_rkv.drivers.http import RkvHttpDriver
from pytest_rkv.drivers.process import ManagedProcess
from pytest_rkv.errors import BackendUnavailable, HarnessError, ProtocolViolation

ENV = "RKV_COMMAND"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CommandDriver(RkvHttpDriver):
    name = "command"
    depth = "native"  # the server itself implements RKV API v1

    @classmethod
    def check_available(cls) -> None:
        if "{port}" not in os.environ.get(ENV, ""):
            raise BackendUnavailable(f"needs {ENV}, the server's command line with a {{port}} placeholder")

    def start(self) -> None:
        port = _free_port()
        argv = [part.replace("{port}", str(port)) for part in shlex.split(os.environ[ENV])]
        self.base_url = f"http://127.0.0.1:{port}"
        self.server = ManagedProcess(argv, log_path=self.settings.workdir / "command.log", name=argv[0])

        def ready() -> bool:
            try:
                self.info()
            except (HarnessError, ProtocolViolation):
                return False
            return True

        self.server.start(ready, timeout=self.settings.startup_timeout)

    def stop(self) -> None:
        super().stop()
        if getattr(self, "server", None) is not None:
            self.server.stop()

    def check_alive(self) -> None:
        if getattr(self, "server", None) is not None:
            self.server.check_alive()

    def log_tail(self, lines: int = 40) -> str:
        return self.server.log_tail(lines) if getattr(self, "server", None) else ""

    def describe(self) -> dict:
        return {**super().describe(), "server_command": os.environ[ENV]}
