"""A urllib client of serve.py (`python -m tools.serve --ckpts=...`), for the tests and for measuring a running server:

    python tests/serve_client.py http://127.0.0.1:8000     # frames/s, key latency, malformed requests
"""
import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np

EVENTS = ["right", "left", "down", "up", "stay"]


# ----------------------------------------------------------------------------- measuring a running server

def watch(url, out, stop):
    """A urllib client (the tests' and measure()'s): read a /stream URL, appending (arrival time,
    kind, data) per message to out, until stop is set or the stream ends."""
    with urllib.request.urlopen(url, timeout=10) as r:
        kind = "message"
        for line in r:
            line = line.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                out.append((time.perf_counter(), kind, json.loads(line[6:])))
                kind = "message"
            if stop.is_set():
                return


def post(url, body=None):
    """GET (body None) or POST raw bytes -> the status code, 4xx and 5xx included."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def measure(url, seconds=5.0, presses=12):
    """The numbers to report: frames/s with one and two clients; key -> first frame generated under
    it; 1,000 malformed requests during a stream (how many got a 4xx, the longest gap between frames)."""
    def streams(n):
        outs, stop = [[] for _ in range(n)], threading.Event()
        for o in outs:
            threading.Thread(target=watch, args=(url + "/stream", o, stop), daemon=True).start()
        return outs, stop

    def fps(out):                                                # the first chunk (warm-up) left out
        t = [a for a, kind, m in out if kind == "message" and m["chunk"] > 0]
        return (len(t) - 1) / (t[-1] - t[0])
    for n in (1, 2):
        outs, stop = streams(n)
        time.sleep(seconds)
        stop.set()
        print(f"{n} client(s): " + ", ".join(f"{fps(o):.1f}" for o in outs) + " frames/s")
    (out,), stop = streams(1)
    while len(out) < 8:
        time.sleep(0.01)
    hello, lat = out[0][2], []
    for k in range(presses):                                     # left, down, up, right, ...: every press a switch
        time.sleep(0.2 + 0.05 * (k % 4))                         # landing anywhere in a chunk
        n, t, ev = len(out), time.perf_counter(), EVENTS[(k + 1) % 4]
        post(url + "/key", json.dumps(dict(event=ev, stream=hello["stream"])).encode())
        while not (hit := [a for a, _, m in out[n:] if m["event"] == ev]):
            time.sleep(0.001)
        lat.append(hit[0] - t)
    print(f"key -> first frame under it: median {1000 * np.median(lat):.0f} ms, max {1000 * max(lat):.0f} ms "
          + (f"(a chunk plays {1000 * hello['chunk'] / hello['fps']:.0f} ms)" if hello["fps"] else "(--fps=0)"))
    bad = [("/key", b'{"event": "jump"}'), ("/key", b"{not json"), ("/key", b"x" * 10000), ("/nope", b"{}"),
           ("/stream?ckpt=nope.pt", None)]
    n, codes = len(out), [post(url + bad[i % 5][0], bad[i % 5][1]) for i in range(1000)]
    stop.set()
    t = [a for a, _, _ in out[n:]]
    print(f"1000 malformed requests: {sum(400 <= c < 500 for c in codes)} got a 4xx; {len(t)} frames "
          f"meanwhile, longest gap {1000 * max(np.diff(t)):.0f} ms")


if __name__ == "__main__":
    import sys
    measure(sys.argv[1].rstrip("/"))
