"""A local web page that streams the generator to a canvas, steered with the arrow keys: two
checkpoints side by side (the baseline and Delta Forcing), fed the same keys.

    python -m tools.serve --ckpts=out/longtune.pt,out/deltaforcing.pt   # then open http://127.0.0.1:8000
    python tests/serve_client.py http://127.0.0.1:8000                  # measure it: frames/s, key latency

Standard library only (http.server, a thread per connection); frames go out as server-sent events
(the endpoints: docs/performance.md). Each stream is a sample.Player seeded with --seed (its own KV cache and noise generator), the stepper
sample.py uses; a key sets its event from the next chunk (--switch_cache: what happens to the cache then).
A stream is a client, and --max_clients caps them (503 past it; the page's two canvases are two). No
request's time or memory grows with what a client sends: see SHORT, MAX_REQUEST, Handler.timeout, gif().
"""

import sys

if not __package__:   # run as a file, the stages are not on the path: say how to run it
    print("run it from the repository root as: python -m tools.serve [--key=value ...]", file=sys.stderr)
    sys.exit(2)

import base64
import collections
import functools
import glob
import io
import itertools
import json
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import imageio.v3 as iio
import numpy as np
import torch

from common import pick_device
from config import BadInput, Config, Count, NonNegative, OneOf, Port, SwitchCache, cli
from sample import Player, load_generator
from world import EVENTS, to_rgb


@dataclass
class ServeConfig(Config):
    ckpts: str = "out/deltaforcing.pt"   # generator checkpoints, comma-separated, one directory: the canvases
    weights: OneOf("ema", "model") = "ema"   # ema | model (the raw weights)
    event: OneOf(*EVENTS) = "right"   # the event every stream starts under (a key then steers)
    switch_cache: SwitchCache = "recache_window"   # at every key that switches the event: recache_window | recache | keep | clear
    fps: NonNegative = 24.0        # frames/s each stream is played at (0 = as fast as they are generated)
    host: str = "127.0.0.1"        # bind address (loopback unless you say otherwise)
    port: Port = 8000              # port to listen on; 0: any free one (the "serving" line names it)
    max_clients: Count = 4         # concurrent streams, more get a clear 503 (connections: 16 more; generators loaded: as many)


PRESETS = {"tiny": {}, "small": {}}
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.html")
SHORT = 16             # connections beside the streams (the page, keys, GIFs, slow clients)
MAX_REQUEST = 1 << 17  # bytes a connection may send (request line, headers, body); past them it reads an end of file
MAX_BODY = 4096        # bytes in a key's body; more is refused (413)
KEEP = 480             # frames per session kept for the GIF: 20 s at 24 frames/s
GENERATORS = ("student", "longtune")


class Session:
    """One client stream: its own Player (KV cache, noise generator), event and last key; its recent frames."""

    def __init__(self, sid, g, event, seed, switch):
        self.id, self.g, self.event, self.live, self.key_t = sid, g, event, True, None
        self.player, self.frames = Player(g, [seed], switch), collections.deque(maxlen=KEEP)


def stamp(path):
    """What changes when a checkpoint is rewritten (atomically, by os.replace); None once it is gone."""
    try:
        st = os.stat(path)
        return st.st_mtime_ns, st.st_size
    except OSError:
        return None


@functools.lru_cache(maxsize=256)
def stage_of(path, version):
    """A checkpoint's stage, or None if unreadable; read again for a new version (stamp). mmap: no weights are read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("stage")
    except Exception:
        return None


class App:
    """What the handler threads share: the page, checkpoints, generators, sessions, the client count, the stop flag."""

    def __init__(self, cfg, device):
        self.cfg, self.lock, self.gif_lock, self.stop = cfg, threading.Lock(), threading.Lock(), threading.Event()
        self.paths = [p for p in cfg.ckpts.split(",") if p]
        self.dir = os.path.dirname(self.paths[0] if self.paths else "") or "."
        if not self.paths or any((os.path.dirname(p) or ".") != self.dir for p in self.paths):
            raise BadInput(f"--ckpts: generator checkpoints in one directory (the picker lists it), not {cfg.ckpts!r}")
        self.sessions, self.ids, self.open = collections.OrderedDict(), itertools.count(1), 0
        with open(PAGE, "rb") as f:                              # read once: the page is part of the code
            self.page = f.read()
        # (path, stamp) -> generator: a rewritten file is loaded again; once unused, --max_clients stay loaded
        self.load = functools.lru_cache(cfg.max_clients)(lambda path, _: load_generator(path, device, cfg.weights))
        for p in self.paths:                                     # a bad checkpoint is one line now, not a 404 later
            self.load(p, stamp(p))

    def checkpoints(self):
        """Names of the generator checkpoints (stage student or longtune) in --ckpts' directory."""
        paths = sorted(glob.glob(os.path.join(glob.escape(self.dir), "*.pt")))
        return [os.path.basename(p) for p in paths if stage_of(p, stamp(p)) in GENERATORS]

    def defaults(self, names):
        """The two canvases: the first two --ckpts; with one, it and the baseline (longtune.pt, else student.pt)."""
        first = [os.path.basename(p) for p in self.paths]
        others = [n for n in ["longtune.pt", "student.pt"] + names if n in names and n != first[0]]
        return (first + others + first)[:2]

    def generator(self, name):
        """The generator of a listed checkpoint (reloaded if the file changed), or None."""
        if name not in self.checkpoints():
            return None
        path = os.path.join(self.dir, name)
        with self.lock:                                          # one load at a time, each file once
            return self.load(path, stamp(path))

    def join(self, g, event):
        """A new session, or None past --max_clients."""
        with self.lock:
            if self.open >= self.cfg.max_clients:
                return None
            self.open += 1
            s = Session(next(self.ids), g, event, self.cfg.seed, self.cfg.switch_cache)
            self.sessions[s.id] = s
            for old in [v for v in self.sessions.values() if not v.live][:-4 * self.cfg.max_clients]:
                del self.sessions[old.id]                        # keep a few ended sessions for their GIF
            return s

    def leave(self, s):
        with self.lock:                                          # an ended session keeps its frames, not its cache
            s.live, s.player, self.open = False, None, self.open - 1

    def play(self, s, send):
        """Generate chunk by chunk and send each frame when it is due (--fps; 0 = as fast as made). A chunk
        starts its expected cost (with a key pending: a switch's) before its first frame is due, so a key lands
        in the next chunk unless that one has started: at most a chunk's playing time plus a generation late."""
        period = 1 / self.cfg.fps if self.cfg.fps > 0 else 0.0
        due, last = time.perf_counter(), s.event                 # when the next frame is due; the last chunk's event
        cost = {False: 0.0, True: 0.0}                           # seconds per chunk without / with a switch
        for k in itertools.count():
            while time.perf_counter() < due - 1.25 * (cost[s.event != last] or 2 * cost[False]) - 0.003:
                if self.stop.wait(0.004):                        # poll: a key may move the start earlier
                    return
            t, event = time.perf_counter(), s.event              # read once: a key that lands now waits a chunk
            frames = to_rgb(s.player.next_chunk(torch.full((1, s.g.chunk), event)).cpu()[0], scale=1)
            s.frames.extend(frames)
            took, switched, last = time.perf_counter() - t, event != last, event
            cost[switched] = 0.8 * cost[switched] + 0.2 * took if cost[switched] else took
            for j, a in enumerate(frames):
                if self.stop.wait(max(0.0, due - time.perf_counter())):
                    return
                png = base64.b64encode(iio.imwrite("<bytes>", a, extension=".png")).decode()
                since = None if s.key_t is None else round(time.perf_counter() - s.key_t, 2)
                send(None, dict(i=k * len(frames) + j, chunk=k, event=EVENTS[event], gen_ms=round(took * 1000, 1),
                                since_key=since, t=round(time.perf_counter(), 4), png=png))
                due = max(due + period, time.perf_counter())   # late (a slow chunk): keep time from now, no burst


class Reader(socket.SocketIO):
    """A connection's reads under one deadline and one byte budget for the whole request, not a timeout
    per read: a client that sends a byte now and then is cut off all the same."""

    def __init__(self, sock, seconds):
        super().__init__(sock, "rb")
        self.sock, self.seconds, self.end, self.left = sock, seconds, time.monotonic() + seconds, MAX_REQUEST

    def readinto(self, b):
        self.sock.settimeout(max(self.end - time.monotonic(), 1e-3))
        n = super().readinto(memoryview(b)[:self.left]) if self.left > 0 else 0
        self.sock.settimeout(self.seconds)                       # what a write may wait
        self.left -= n
        return n


class Handler(BaseHTTPRequestHandler):
    """One thread per connection. Successes are silent; each refused request is one log line and a 4xx or 503."""
    timeout = 10                                                 # seconds for the request to arrive, and for a write

    def setup(self):
        super().setup()
        self.rfile.close()                                       # the plain reader, replaced by one with a deadline
        self.rfile = io.BufferedReader(Reader(self.connection, self.timeout))

    def handle(self):
        """Past --max_clients + SHORT connections, a 503 at once, before the request is read."""
        if self.server.slots.acquire(blocking=False):
            try:
                return super().handle()
            finally:
                self.server.slots.release()
        self.command, self.path, self.request_version = "-", "", "HTTP/1.0"   # no request read
        self.reject(503, f"too many connections (--max_clients + {SHORT})")

    def log_request(self, code="-", size="-"):
        pass

    def reply(self, code, body, ctype="application/json", headers=()):
        body = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        for k, v in [("Content-Type", ctype), ("Content-Length", str(len(body))), *headers]:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def reject(self, code, why):
        why = why[:500]                                          # it may quote the request, which may be long
        self.log_message("%s %r -> %d %s", self.command, self.path[:100], code, why)
        self.reply(code, dict(error=why))

    def do_GET(self):
        url, app = urlparse(self.path), self.server.app
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if url.path == "/":
            self.reply(200, app.page, "text/html; charset=utf-8")
        elif url.path == "/ckpts":
            names = app.checkpoints()
            self.reply(200, dict(ckpts=names, default=app.defaults(names), event=app.cfg.event, events=EVENTS,
                                 open=app.open, max_clients=app.cfg.max_clients))
        elif url.path == "/stream":
            self.stream(app, q.get("ckpt", app.defaults([])[0]), q.get("event", app.cfg.event))
        elif url.path == "/gif":
            self.gif(app, q.get("streams", "").split(","))
        else:
            self.reject(404, "unknown path")

    def do_POST(self):
        """POST /key {"event": E, "stream": ID}: the stream's next chunk is generated under E."""
        n, app = self.headers.get("Content-Length", ""), self.server.app
        if urlparse(self.path).path != "/key":
            return self.reject(404, "unknown path")
        if not n.isdecimal() or len(n) > 18:                     # 18 digits: more than any body, and a cheap int
            return self.reject(411, "a Content-Length (a byte count) is required")
        body = self.rfile.read(min(int(n), MAX_REQUEST))         # all of it, even past MAX_BODY: closing on
        if len(body) > MAX_BODY:                                 # unread data resets the connection, reply and all
            return self.reject(413, f"body of {n} bytes; at most {MAX_BODY}")
        try:
            body = json.loads(body)
        except (ValueError, RecursionError):                     # not UTF-8, not JSON, nested too deep
            return self.reject(400, "body is not JSON")
        event, sid = (body.get("event"), body.get("stream")) if isinstance(body, dict) else (None, None)
        if not isinstance(event, str) or event not in EVENTS:
            return self.reject(400, f"unknown event {event!r}; events are {', '.join(EVENTS)}")
        with app.lock:
            hit = [s for s in app.sessions.values() if s.live and sid in (None, s.id)]
        if sid is not None and not hit:
            return self.reject(404, f"no open stream {sid!r}")
        for s in hit:
            s.event, s.key_t = EVENTS.index(event), time.perf_counter()   # picked up at the next chunk
        self.reply(200, dict(event=event, streams=[s.id for s in hit]))

    def do_PUT(self):
        self.reject(405, "method not allowed")
    do_DELETE = do_PATCH = do_PUT

    def stream(self, app, name, event):
        """GET /stream: a new session streamed as server-sent events until the page goes or the server stops."""
        if event not in EVENTS:
            return self.reject(400, f"unknown event {event!r}")
        try:
            g = app.generator(name)
        except (BadInput, OSError) as e:                         # listed, but unreadable or gone now
            return self.reject(400, str(e))
        if g is None:
            return self.reject(404, f"unknown checkpoint {name!r}; GET /ckpts lists them")
        s = app.join(g, EVENTS.index(event))
        if s is None:
            return self.reject(503, f"{app.cfg.max_clients} streams already open (--max_clients={app.cfg.max_clients})")
        try:
            self.send_response(200)
            for k, v in (("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")):
                self.send_header(k, v)
            self.end_headers()
            self.send_event("hello", dict(stream=s.id, ckpt=name, size=g.world.size, chunk=g.chunk, fps=app.cfg.fps))
            app.play(s, self.send_event)
        except (ConnectionError, TimeoutError):                  # the page went away: end quietly
            pass
        finally:
            app.leave(s)

    def send_event(self, kind, data):
        self.wfile.write(((f"event: {kind}\n" if kind else "") + f"data: {json.dumps(data)}\n\n").encode())

    def gif(self, app, ids):
        """GET /gif?streams=1,2: the sessions' kept frames side by side, upscaled 4x, as a GIF download."""
        if len(ids) > app.cfg.max_clients or len(set(ids)) < len(ids):
            return self.reject(400, f"name each stream once, at most {app.cfg.max_clients} (--max_clients)")
        try:
            sessions = [app.sessions[int(i)] for i in ids]
        except (ValueError, KeyError):
            return self.reject(404, f"unknown streams {','.join(ids)!r}")
        n = min(len(s.frames) for s in sessions)
        if n == 0 or len({s.g.world.size for s in sessions}) > 1:
            return self.reject(409, "no frames yet, or frames of different sizes")
        with app.gif_lock:                                       # one at a time: the most memory a request takes
            video = np.concatenate([np.stack(list(s.frames)[-n:]) for s in sessions], 2).repeat(4, 1).repeat(4, 2)
            gif = iio.imwrite("<bytes>", video, extension=".gif", duration=1000 / (app.cfg.fps or 24), loop=0)
        self.reply(200, gif, "image/gif", [("Content-Disposition", 'attachment; filename="session.gif"')])


class Server(ThreadingHTTPServer):
    request_queue_size = 4 * SHORT                               # a burst is accepted (and answered), not dropped
    block_on_close = False                                       # close() waits for the streams, not a slow client


def start(cfg, device):
    """Load the checkpoints and listen (serving in a thread) -> (server, app). Bad input: BadInput."""
    app = App(cfg, device)
    try:
        server = Server((cfg.host, cfg.port), Handler)
    except OSError as e:                                         # busy port, unknown host
        raise BadInput(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
    server.app, server.slots = app, threading.BoundedSemaphore(cfg.max_clients + SHORT)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, app


def close(server, app, wait=2.0):
    """Stop accepting, end the streams (each sees the stop flag within a frame), release the port."""
    app.stop.set()
    server.shutdown()
    server.server_close()
    t = time.perf_counter()
    while app.open and time.perf_counter() - t < wait:
        time.sleep(0.01)


def main(cfg):
    """Serve until Ctrl-C or SIGTERM, then stop cleanly (exit 0)."""
    server, app = start(cfg, pick_device(cfg.device, precision=cfg.precision, interactive=True))
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda n, f: app.stop.set())
    host, port = server.server_address[:2]
    rate = f"{cfg.fps:g} frames/s each" if cfg.fps > 0 else "each as fast as generated"
    print(f"serving http://{host}:{port} ({', '.join(app.defaults(app.checkpoints()))}; up to {cfg.max_clients} "
          f"streams, {rate}) - Ctrl-C stops", flush=True)
    app.stop.wait()                                              # the signal handler runs here and sets it
    close(server, app)
    print("stopped", flush=True)


if __name__ == "__main__":
    cli(main, ServeConfig, PRESETS)
