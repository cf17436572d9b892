"""An HTTP proxy in front of the GCS emulator that counts the bytes it hands each client: point one
process's STORAGE_EMULATOR_HOST at one proxy to learn what that process fetched."""

import http.client
import sys
import threading
from http import server
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "host"}


class _Server(server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client hanging up (exiting) is no error
            super().handle_error(request, client_address)


class CountingProxy:
    """Forwards every request to `upstream`; `bytes` is the total of the response bodies sent back."""

    def __init__(self, upstream: str):
        self.upstream, self.bytes, self.requests = urlsplit(upstream), 0, 0
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def _handler(self):
        proxy = self

        class Handler(server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # else each response waits out a delayed ACK (40 ms)

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                upstream.request(self.command, self.path, body=body or None, headers=headers)
                response = upstream.getresponse()
                content = response.read()
                upstream.close()
                with proxy._lock:
                    proxy.bytes += len(content)
                    proxy.requests += 1
                self.send_response(response.status)
                for k, v in response.getheaders():
                    if k.lower() not in HOP_BY_HOP | {"content-length"}:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _forward

            def log_message(self, *args):
                pass

        return Handler

    def close(self):
        self._httpd.shutdown()
        self._httpd.server_close()
