import os

import pytest

# Keep each test single-threaded and quiet: the suite runs on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _single_thread():
    import torch

    torch.set_num_threads(1)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(backend_store_uri: str, artifacts_destination, timeout: float = 180):
    """A real `mlflow server` on a free loopback port: (url, process). Stop it with stop_process_group."""
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "2", "--backend-store-uri", backend_store_uri,
         "--artifacts-destination", str(artifacts_destination)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return url, server
        except OSError:
            time.sleep(0.5)
    stop_process_group(server)
    raise AssertionError("mlflow server did not start")


def stop_process_group(process) -> None:
    import os
    import signal

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
