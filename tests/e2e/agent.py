#!/usr/bin/env python3
"""The e2e node's command channel: runs on the guest node, serves the host's scenario driver.

    agent.py ADDRESS PORT LIB

POST /run with a bash script as the body: runs `bash -c '. LIB; <script>'` and answers with the exit
status on the first line, then the script's output (stdout and stderr, interleaved). POST /shutdown
ends the agent. Requests are served concurrently (scenarios run side by side).

Why: kubectl and the Go sidecars start slowly in user-mode Linux (seconds per process), so the
scenarios talk to the API server from the host, and only what must be seen or done on the node
(device-mapper, files, processes) is sent here. The address is the guest's end of the test network
namespace's private tap link: nothing else can reach it.
"""

import http.server
import subprocess
import sys
import threading

ADDRESS, PORT, LIB = sys.argv[1], int(sys.argv[2]), sys.argv[3]
REQUEST_TIMEOUT = 900


class Agent(http.server.BaseHTTPRequestHandler):
    def log_message(self, fmt, *args):  # the host logs what it asked
        pass

    def answer(self, rc, output):
        body = f"{rc}\n".encode() + output
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        script = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()
        if self.path == "/shutdown":
            self.answer(0, b"")
            # serve_forever() runs in the main thread; shutdown() waits for it, so not from there.
            threading.Thread(target=self.server.shutdown).start()
            return
        if self.path != "/run":
            self.send_error(404)
            return
        try:
            done = subprocess.run(
                ["bash", "-c", f". {LIB}\n{script}"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=REQUEST_TIMEOUT,
            )
            self.answer(done.returncode, done.stdout)
        except subprocess.TimeoutExpired as e:
            self.answer(124, (e.stdout or b"") + f"\nagent: timed out after {REQUEST_TIMEOUT}s\n".encode())


server = http.server.ThreadingHTTPServer((ADDRESS, PORT), Agent)
server.daemon_threads = True
print(f"agent: serving on {ADDRESS}:{PORT}", flush=True)
server.serve_forever()
