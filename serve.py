"""A local web page that streams the generator to a canvas, steered with the arrow keys: two
checkpoints side by side (the baseline and Delta Forcing), fed the same keys.

    python serve.py --ckpts=out/longtune.pt,out/deltaforcing.pt    # then open http://127.0.0.1:8000
    python tests/serve_client.py http://127.0.0.1:8000             # measure a running server (frames/s, key latency)

Standard library only (http.server, a thread per connection); frames go out as server-sent events:
  GET  /                          the page, serve.html (/?frames=N: each canvas stops after N frames, for screenshots)
  GET  /ckpts                     {ckpts: the generator checkpoints beside --ckpts, default: [left, right], ...}
  GET  /stream?ckpt=NAME&event=E  text/event-stream: `hello` {stream, ckpt, size, chunk, fps}, then per frame
                                  {i, chunk, event, gen_ms, since_key, t, png}: the event its chunk was made
                                  under, and the frame as a base64 PNG at native size (under 1 KB)
  POST /key {"event": E, "stream": ID}   steer that stream (without "stream": every open one) from its next chunk
  GET  /gif?streams=ID,ID         the sessions side by side as one GIF (a download)
A stream is a client: --max_clients caps them (503 past it); the page's two canvases are two.
Each stream is a sample.Player seeded with --seed (its own KV cache and noise generator), the
stepper that sample.py and --live use: there is no second inference loop. A key only sets the
stream's event; the next chunk is generated under it, and --switch_cache says what happens to
the cache at the switch.
"""
import base64
import collections
import glob
import itertools
import json
import os
import signal
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
    max_clients: Count = 4         # concurrent streams; more get a clear 503


PRESETS = {"tiny": {}, "small": {}}
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.html")
MAX_BODY = 4096        # bytes: a key is about 40; anything bigger is refused (413)
KEEP = 480             # frames per session kept for the GIF: 20 s at 24 frames/s, 370 KB at 16 x 16
GENERATORS = ("student", "longtune")


class Session:
    """One client stream: its own Player (KV cache, noise generator) and current event; its recent frames."""

    def __init__(self, sid, g, event, seed, switch):
        self.id, self.g, self.event, self.live, self.key_t = sid, g, event, True, None   # key_t: the last key
        self.player = Player(g, [seed], switch)                  # every draw of the stream: one seed
        self.frames = collections.deque(maxlen=KEEP)

    def next_chunk(self):
        """One chunk under the current event -> (event id, (chunk,S,S,3) uint8 frames)."""
        event = self.event                                       # read once: a key that lands now waits a chunk
        x = self.player.chunk(torch.full((1, self.g.chunk), event)).cpu()   # (1,chunk,3,S,S)
        frames = to_rgb(x[0], scale=1)
        self.frames.extend(frames)
        return event, frames


def stamp(path):
    """What changes when a checkpoint is rewritten (atomically, by os.replace)."""
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


def stage_of(path):
    """A checkpoint's stage, or None if unreadable. mmap: the weights are never read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("stage")
    except Exception:
        return None


class App:
    """What the handler threads share: the page, checkpoints, generators, sessions, the client count, the stop flag."""

    def __init__(self, cfg, device):
        self.cfg, self.lock, self.stop = cfg, threading.Lock(), threading.Event()
        self.paths = [p for p in cfg.ckpts.split(",") if p]
        if not self.paths:
            raise BadInput("--ckpts needs at least one generator checkpoint")
        self.dir = os.path.dirname(self.paths[0]) or "."
        if any((os.path.dirname(p) or ".") != self.dir for p in self.paths):
            raise BadInput(f"--ckpts must all be in one directory (the picker lists it), not {cfg.ckpts!r}")
        self.event = cfg.event
        self.stages, self.gens, self.open = {}, {}, 0          # path -> (stamp, stage), name -> (stamp, generator)
        self.sessions, self.ids = collections.OrderedDict(), itertools.count(1)
        with open(PAGE, "rb") as f:                              # read once: the page is part of the code
            self.page = f.read()
        self.load = lambda name: load_generator(os.path.join(self.dir, name), device, cfg.weights)
        for p in self.paths:                                     # a bad checkpoint is one line now, not a 404 later
            g = self.load(os.path.basename(p))
            self.gens[os.path.basename(p)] = (stamp(p), g)

    def checkpoints(self):
        """Names of the generator checkpoints (stage student or longtune) in --ckpts' directory."""
        names = []
        with self.lock:
            for p in sorted(glob.glob(os.path.join(self.dir, "*.pt"))):
                try:
                    k = stamp(p)
                except OSError:                                  # removed meanwhile
                    continue
                if self.stages.get(p, (None,))[0] != k:          # stat is cheap; torch.load only when it changed
                    self.stages[p] = (k, stage_of(p))
                names += [os.path.basename(p)] if self.stages[p][1] in GENERATORS else []
        return names

    def defaults(self, names):
        """The two canvases: the first two --ckpts; with one, it and the baseline (longtune.pt, else student.pt)."""
        first = [os.path.basename(p) for p in self.paths]
        others = [n for n in ["longtune.pt", "student.pt"] + names if n in names and n != first[0]]
        return (first + others + first)[:2]

    def generator(self, name):
        """The loaded generator of a listed checkpoint (reloaded if the file changed), or None."""
        if name not in self.checkpoints():
            return None
        k = stamp(os.path.join(self.dir, name))
        with self.lock:                                          # one load at a time, each file once
            if self.gens.get(name, (None,))[0] != k:
                self.gens[name] = (k, self.load(name))
            return self.gens[name][1]

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
        with self.lock:
            s.live, self.open = False, self.open - 1

    def play(self, s, send):
        """Generate chunk by chunk and send each frame when it is due (--fps; 0 = as fast as made).
        A chunk starts just in time: its expected cost before its first frame is due, the cost of a
        switch (a recache) if a key is pending. So a key is in the next chunk unless that chunk has
        started: at most a chunk's playing time plus a generation late."""
        period = 1 / self.cfg.fps if self.cfg.fps > 0 else 0.0
        due, last = time.perf_counter(), s.event                 # when the next frame is due; the last chunk's event
        cost = {False: 0.0, True: 0.0}                           # seconds per chunk without / with a switch
        for k in itertools.count():
            while time.perf_counter() < due - 1.25 * (cost[s.event != last] or 2 * cost[False]) - 0.003:
                if self.stop.wait(0.004):                        # poll: a key may move the start earlier
                    return
            t = time.perf_counter()
            event, frames = s.next_chunk()
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


class Handler(BaseHTTPRequestHandler):
    """One thread per connection (ThreadingHTTPServer). Successes are silent; each refused request
    is one log line and a 4xx, and never touches the streams."""
    timeout = 10                                                 # a silent or stalled client frees its thread

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
        self.log_message("%s %r -> %d %s", self.command, self.path[:100], code, why)
        self.reply(code, dict(error=why))

    def do_GET(self):
        url, app = urlparse(self.path), self.server.app
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if url.path == "/":
            self.reply(200, app.page, "text/html; charset=utf-8")
        elif url.path == "/ckpts":
            names = app.checkpoints()
            self.reply(200, dict(ckpts=names, default=app.defaults(names), event=app.event, events=EVENTS,
                                 open=app.open, max_clients=app.cfg.max_clients))
        elif url.path == "/stream":
            self.stream(app, q.get("ckpt", app.defaults([])[0]), q.get("event", app.event))
        elif url.path == "/gif":
            self.gif(app, q.get("streams", ""))
        elif url.path == "/favicon.ico":
            self.reply(204, b"")
        else:
            self.reject(404, "unknown path")

    def do_POST(self):
        """POST /key {"event": E, "stream": ID}: the stream's next chunk is generated under E."""
        if urlparse(self.path).path != "/key":
            return self.reject(404, "unknown path")
        n = self.headers.get("Content-Length", "")
        if not n.isdigit():
            return self.reject(411, "a Content-Length is required")
        if int(n) > MAX_BODY:
            try:                                                 # drain what was sent: closing on unread data
                self.connection.settimeout(0.2)                  # resets the connection, and the 413 with it
                self.rfile.read(min(int(n), 1 << 16))
            except OSError:                                      # it sent less than it said
                pass
            return self.reject(413, f"body of {n} bytes; at most {MAX_BODY}")
        try:
            body = json.loads(self.rfile.read(int(n)))
        except (ValueError, RecursionError):                     # not UTF-8, not JSON, nested too deep
            return self.reject(400, "body is not JSON")
        event, sid = (body.get("event"), body.get("stream")) if isinstance(body, dict) else (None, None)
        if not isinstance(event, str) or event not in EVENTS:
            return self.reject(400, f"unknown event {event!r}; events are {', '.join(EVENTS)}")
        with self.server.app.lock:
            hit = [s for s in self.server.app.sessions.values() if s.live and sid in (None, s.id)]
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
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
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
        """GET /gif?streams=1,2: the sessions' kept frames side by side, upscaled x4 (as --live), as a GIF download."""
        try:
            sessions = [app.sessions[int(i)] for i in ids.split(",")]
        except (ValueError, KeyError):
            return self.reject(404, f"unknown streams {ids!r}")
        n = min(len(s.frames) for s in sessions)
        if n == 0 or len({s.g.world.size for s in sessions}) > 1:
            return self.reject(409, "no frames yet, or frames of different sizes")
        video = np.concatenate([np.stack(list(s.frames)[-n:]) for s in sessions], 2).repeat(4, 1).repeat(4, 2)
        gif = iio.imwrite("<bytes>", video, extension=".gif", duration=1000 / (app.cfg.fps or 24), loop=0)
        self.reply(200, gif, "image/gif", [("Content-Disposition", 'attachment; filename="session.gif"')])


def start(cfg, device):
    """Load the checkpoints and listen (serving in a thread) -> (server, app). Bad input: BadInput."""
    app = App(cfg, device)
    try:
        server = ThreadingHTTPServer((cfg.host, cfg.port), Handler)
    except OSError as e:                                         # busy port, unknown host
        raise BadInput(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
    server.app = app
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
    server, app = start(cfg, pick_device(cfg.device, precision=cfg.precision))
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
