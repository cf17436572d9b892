"""Does a gs:// run.output_dir slow the step loop? The smoke run with its output on local disk, then
on a GCS emulator behind a proxy that delays every request, each run twice; then a run on the slow
bucket stopped by SIGTERM, and which of its logged rows are in the bucket afterwards.

    python benchmarks/output_gcs.py [--delay-s 0.2] [--steps 200] [key=value ...]

Step time is the median of the logged rows' step_time_s after the first two (compile and warm-up).
Run it on an idle machine (it refuses a 1-minute load above 0.5 without --any-load).
"""

import argparse
import http.client
import http.server
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import idle  # noqa: E402
from checkpoint_io import start_emulator  # noqa: E402


def delaying_proxy(target: str, delay_s: float) -> str:
    """An HTTP proxy to `target` that sleeps `delay_s` before each request; returns its URL."""
    upstream = urllib.parse.urlparse(target)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self):
            time.sleep(delay_s)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            conn = http.client.HTTPConnection(upstream.hostname, upstream.port)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "transfer-encoding")}
            conn.request(self.command, self.path, body=body, headers=headers)
            reply = conn.getresponse()
            data = reply.read()
            self.send_response(reply.status)
            for k, v in reply.getheaders():
                if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up on this request
                pass
            conn.close()

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):  # clients that hang up (TensorStore does) are no news
            pass

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def gs_get(url: str, name: str) -> bytes:
    return urllib.request.urlopen(f"{url}/storage/v1/b/bench/o/{urllib.parse.quote(name, safe='')}?alt=media").read()


def train(output_dir: str, env: dict, overrides: list[str], sigterm_at: int = 0) -> tuple[str, float, float]:
    """(printed, median step time, CPU seconds per step) of one smoke run."""
    command = [sys.executable, "-m", "pretrain", "smoke", "llm", *overrides, f"run.output_dir={output_dir}",
               "train.log_every=5", "runtime.step_timeout_s=0"]
    start_cpu = os.times()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if sigterm_at and re.match(rf"step +{sigterm_at}/", line):
            proc.send_signal(signal.SIGTERM)
    proc.wait()
    end_cpu = os.times()
    printed = "".join(lines)
    times = [float(ms) / 1000 for ms in re.findall(r"\| step ([\d.]+) ms", printed)][2:]
    steps = len(re.findall(r"^step +\d+/\d+ \| loss", printed, re.M)) * 5
    cpu = (end_cpu.children_user + end_cpu.children_system) - (start_cpu.children_user + start_cpu.children_system)
    return printed, statistics.median(times), cpu / max(steps, 1)


def delayed_gcs_args(doc: str, delay_s: float) -> argparse.Namespace:
    """The command line of the delayed-GCS benchmarks; exits 2 on a busy machine (benchmarks/idle.py)
    unless --any-load."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--delay-s", type=float, default=delay_s)
    parser.add_argument("--steps", type=int, default=200)
    idle.add_flag(parser)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    idle.check(args.any_load)
    return args


def main() -> int:
    args = delayed_gcs_args(__doc__, delay_s=0.2)
    server = start_emulator()
    proxy = delaying_proxy(server.url, args.delay_s)
    env = dict(os.environ, STORAGE_EMULATOR_HOST=proxy, TENSORSTORE_GCS_HTTP_URL=proxy)
    overrides = [f"run.steps={args.steps}", *args.overrides]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for attempt in (1, 2):
            for where, out in (("local disk", f"{tmp}/local{attempt}"), (f"gs:// +{args.delay_s * 1000:.0f} ms", f"gs://bench/run{attempt}")):
                _, step_s, cpu = train(out, env, overrides)
                rows.append((attempt, where, step_s, cpu))
                print(f"run {attempt}, output on {where:<14}: {1000 * step_s:8.1f} ms/step, {cpu:.3f} CPU s/step", flush=True)
    for attempt in (1, 2):
        local, remote = (r[2] for r in rows if r[0] == attempt)
        print(f"run {attempt}: gs:// / local step time = {remote / local:.3f}")
    printed, _, _ = train("gs://bench/preempted", env, overrides, sigterm_at=50)
    logged = [int(s) for s in re.findall(r"^step +(\d+)/\d+ \| loss", printed, re.M)]
    stored = [json.loads(line)["step"] for line in gs_get(server.url, "preempted/metrics.jsonl").decode().splitlines()
              if "loss" in json.loads(line)]
    print(f"SIGTERM at step 50: {len(logged)} rows logged (last step {logged[-1]}), {len(stored)} in gs:// "
          f"({'all' if stored == logged else 'NOT all'}); {printed.strip().splitlines()[-1]}")
    print(f"1-minute load after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
