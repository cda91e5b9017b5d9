"""Measure the single-file binary against its targets; exit 1 if it misses one.

    python3 packaging/measure.py dist/evomsgd [--starts 5] [--json]

size: bytes on disk (target < 30 MB). ready: seconds from spawning `evomsgd serve --sandbox` on a
fresh data directory to the first 200 from GET /health (target: median of the starts <= 0.8 s).
Each start unpacks the binary again (fresh TMPDIR), as a real start does. Standard library only.
bench/run.py times the pip-installed `evomsgd` with the same `time_to_ready`, for the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

MAX_BYTES = 30 * 1000 * 1000
MAX_READY = 0.8


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def time_to_ready(*command: str, timeout: float = 20.0) -> float:
    """Seconds from spawning `command serve --sandbox` to its first /health 200."""
    with tempfile.TemporaryDirectory() as scratch:
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("EVOMSGD_", "EVOLUTION_"))}
        env["TMPDIR"] = scratch
        argv = [*command, "serve", "--sandbox", "--data-dir", os.path.join(scratch, "data")]
        started = time.monotonic()
        proc = subprocess.Popen([*argv, "--port", str(port)], env=env, stderr=subprocess.DEVNULL)
        try:
            while not _healthy(port):
                if proc.poll() is not None:
                    raise SystemExit(f"{argv[0]} exited with {proc.returncode} before serving")
                if time.monotonic() - started > timeout:
                    raise SystemExit(f"{argv[0]} not healthy after {timeout}s")
                time.sleep(0.005)
            elapsed = time.monotonic() - started
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("binary")
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args()
    size = os.path.getsize(args.binary)
    starts = [time_to_ready(args.binary) for _ in range(args.starts)]
    ready = statistics.median(starts)
    ok = size < MAX_BYTES and ready <= MAX_READY
    if args.json:
        print(
            json.dumps(
                {"size_bytes": size, "ready_seconds": starts, "ready_median": ready, "ok": ok}
            )
        )
    else:
        print(f"size  {size / 1e6:.1f} MB (target < {MAX_BYTES / 1e6:.0f} MB)")
        print(
            f"ready median {ready:.3f} s of {len(starts)} starts (target <= {MAX_READY} s): "
            + " ".join(f"{s:.3f}" for s in starts)
        )
        print("targets met" if ok else "TARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
