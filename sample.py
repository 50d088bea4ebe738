"""Streaming interactive generation from any generator checkpoint, and --eval, the benchmark.

    python sample.py --ckpt=out/longtune.pt --events=right@0,up@24,left@48 --frames=96 --out=out/sample.gif
    python sample.py --eval --ckpts=out/student.pt,out/longtune.pt --seeds=8 --json=out/eval.json
    python sample.py --live --ckpt=out/deltaforcing.pt        # steer it with the arrow keys, q quits
    python sample.py --serve --ckpt=out/deltaforcing.pt       # the same in a browser: http://127.0.0.1:8000

Generation streams chunk by chunk through the KV cache (sink + rolling window) and hands each
chunk to the GIF/MP4 writer as it comes, so the generator's memory stays constant for any length.
Each video's noise (initial and re-noising) comes from its own generator seeded by its own seed,
so a video's result never depends on which other videos share its batch. --eval runs the same
videos (schedules x seeds) through every checkpoint and prints the world metrics with 95%
intervals over seeds.
"""
import contextlib
import json
import math
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from common import BadInput, autocast, cli, compile_, load_checkpoint, pick_device
from model import KVCache, build, rollout
from world import EVENTS, World, batch_metrics, parse_schedule, schedule_events, to_rgb

METRICS = ["react", "latency", "follow", "identity", "bias", "jumps", "valid", "drift"]


@dataclass
class SampleConfig:
    preset: str = "tiny"
    device: str = "auto"
    ckpt: str = "out/longtune.pt"
    weights: str = "ema"           # ema | model (the raw weights)
    events: str = "right@0,up@24,left@48"
    frames: int = 96
    out: str = "out/sample.gif"
    seed: int = 0
    switch_cache: str = "recache"
    eval: bool = False
    ckpts: str = ""                # --eval: comma-separated checkpoints (default: --ckpt)
    schedule_file: str = ""        # --eval: JSON list of schedule strings, each --frames long
    seeds: int = 8
    first_seed: int = 0            # --eval: seeds first_seed .. first_seed + seeds - 1 (tune on some, report on fresh ones)
    pool: bool = True              # --eval: pool checkpoints named NAME_s<k>.pt (training seeds) into one row NAME
    json: str = ""
    md: str = ""                   # --eval: also append the markdown tables to this file
    live: bool = False             # stream to the terminal; arrow keys switch the event, q quits and saves --out
    fps: float = 24.0              # --live and --serve: frames/s shown (0 = as fast as they are generated)
    compile: bool = True           # CUDA only, generation and --live: the streaming step as a CUDA graph
    serve: bool = False            # serve a local web page that streams the generator and steers it (serve.py)
    host: str = "127.0.0.1"        # --serve: bind address (loopback unless you say otherwise)
    port: int = 8000               # --serve: port
    max_clients: int = 4           # --serve: concurrent streams; more get a clear 503


PRESETS = {"tiny": {}, "small": {}}


@dataclass
class Generator:
    """A causal generator loaded for streaming: the network and how it streams."""
    model: torch.nn.Module
    stream: dict                   # chunk, sigmas, n_sink, n_window, window (the teacher's clip length)
    world: World

    @property
    def chunk(self):
        return self.stream["chunk"]


def load_generator(path, device, weights="ema"):
    """Any causal generator checkpoint (student or long-tuned)."""
    ck = load_checkpoint(path, ["student", "longtune"], "python distill.py (or python longtune.py)")
    return Generator(build(ck["model_args"], ck[weights], device).eval(), ck["stream"], World(**ck["world"]))


def builtin_schedules(W):
    """(group, schedule, frames) in units of the teacher window W: one switch, several, long
    horizons, switches off the chunk grid, and rapid switching."""
    one = [("right", "up"), ("down", "left"), ("left", "down"), ("up", "right")]
    return ([("switch", f"{a}@0,{b}@{2 * W}", 4 * W) for a, b in one]
            + [("multi", f"right@0,down@{W + W // 2},left@{3 * W},up@{4 * W + W // 2}", 6 * W),
               ("multi", f"up@0,left@{W},down@{2 * W},right@{3 * W},stay@{4 * W}", 6 * W)]
            + [("long", f"left@0,up@{3 * W},right@{6 * W}", 8 * W), ("long", f"down@0,right@{4 * W}", 8 * W),
               ("long", "right@0", 8 * W)]
            + [("offgrid", f"down@0,right@{2 * W - 3},up@{3 * W + 1}", 4 * W),
               ("offgrid", f"up@0,left@{W + 1},down@{3 * W - 1}", 4 * W)]
            + [("rapid", f"right@0,up@{2 * W},left@{2 * W + 4},down@{2 * W + 8},right@{2 * W + 12}", 4 * W),
               ("rapid", f"left@0,down@{W},right@{W + 4},up@{W + 8},left@{W + 12}", 3 * W)])


@torch.no_grad()
def generate(g, ev, seeds, switch, on_chunk=None):
    """Stream the videos for per-frame events ev (B,T). Video b's initial noise and re-noising
    draws come from one generator seeded with seeds[b], and from nothing else.
    on_chunk(x) sees each chunk as it is made. -> (videos or None, seconds per chunk)."""
    B, T = ev.shape
    S, ch = g.world.size, g.chunk
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    cache, outs, times = KVCache(g.stream["n_sink"], g.stream["n_window"]), [], []
    for i in range(0, T, ch):                                    # rollout chunk by chunk = one long rollout
        t = time.perf_counter()
        noise = torch.stack([torch.randn(ch, 3, S, S, generator=gn) for gn in gens]).to(ev.device)   # (B,ch,3,S,S)
        with autocast(ev.device):
            x = rollout(g.model, noise, ev[:, i:i + ch], g.stream["sigmas"], ch, cache, switch=switch, gen=gens).float()
        if x.device.type == "cuda":
            torch.cuda.synchronize()                             # time the work, not the launch
        times.append(time.perf_counter() - t)
        (on_chunk or outs.append)(x.cpu())
    return (torch.cat(outs, 1) if outs else None), times


def schedule_tensor(text, frames, chunk, B, device):
    return schedule_events(parse_schedule(text, frames), frames, chunk)[None].expand(B, frames).to(device)


def open_writer(path):
    """A GIF or MP4 writer that takes frames as they come; an unusable path is one clear line."""
    import imageio.v2 as imageio
    if not path.endswith((".gif", ".mp4")):
        raise BadInput(f"--out must end in .gif or .mp4, not {path!r}")
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "ab"):                                   # fail now, not after generating
            pass
        return (imageio.get_writer(path, fps=8, macro_block_size=1) if path.endswith(".mp4")
                else imageio.get_writer(path, duration=125, loop=0))
    except OSError as e:
        raise BadInput(f"cannot write {path}: {e.strerror or e}") from None


def sample_one(cfg, g, device):
    import imageio.v2 as imageio
    ev = schedule_tensor(cfg.events, cfg.frames, g.chunk, 1, device)
    writer = open_writer(cfg.out)
    strip, every = [], max(1, cfg.frames // 16)

    def write(x):                                                # (1,chunk,3,S,S) -> frames appended as they come
        for a in to_rgb(x[0]):
            writer.append_data(a)
            if write.n % every == 0 and len(strip) < 16:
                strip.append(a)
            write.n += 1
    write.n = 0
    _, times = generate(g, ev, [cfg.seed], cfg.switch_cache, on_chunk=write)
    writer.close()
    png = os.path.splitext(cfg.out)[0] + ".png"
    imageio.imwrite(png, np.concatenate(strip, 1))
    steady = times[1:] or times
    print(f"{cfg.frames} frames -> {cfg.out} and {png} | {g.chunk * len(steady) / sum(steady):.1f} frames/s "
          f"| first chunk {times[0] * 1000:.1f} ms | device {device}")


# ----------------------------------------------------------------------------- the benchmark

def eval_schedules(cfg, W):
    """The schedules of an evaluation: --schedule_file's, or the built-in set."""
    if not cfg.schedule_file:
        return builtin_schedules(W)
    try:
        items = json.load(open(cfg.schedule_file))
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot read --schedule_file {cfg.schedule_file}: {e}") from None
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise BadInput(f"--schedule_file {cfg.schedule_file} must hold a JSON list of schedule strings")
    return [("file", s, cfg.frames) for s in items]


def check_eval(cfg, gens, schedules):
    """Every check of an evaluation, before any work."""
    if cfg.seeds <= 0:
        raise BadInput(f"--seeds must be positive, not {cfg.seeds}")
    for flag, path in (("json", cfg.json), ("md", cfg.md)):
        try:
            open(path, "a").close() if path else None            # fail now, not after the evaluation
        except OSError as e:
            raise BadInput(f"cannot write --{flag}={path}: {e.strerror or e}") from None
    for _, s, n in schedules:
        check_frames(n, gens[0].chunk)
        parse_schedule(s, n)


def schedule_videos(g, schedules, seeds, switch):
    """Every schedule x seed through one generator, as the benchmark draws them (video seed
    1000 j + s for schedule j) -> yields (group, events (B,T) on the CPU, videos (B,T,...))."""
    for j, (group, text, n) in enumerate(schedules):
        ev = schedule_tensor(text, n, g.chunk, len(seeds), "cpu")
        x, _ = generate(g, ev.to(next(g.model.parameters()).device), [1000 * j + s for s in seeds], switch)
        yield group, ev, x


def score(g, schedules, seeds, switch):
    """Every schedule x seed through one generator -> {(group, metric): (schedules, seeds) values}."""
    per = {}
    for group, ev, x in schedule_videos(g, schedules, seeds, switch):
        m = batch_metrics(x, ev, g.world, first=g.chunk, chunk=g.chunk)
        for k in METRICS + ["n_react"]:
            for grp in (group, "all"):
                per.setdefault((grp, k), []).append(m[k])
    return per


def interval(vals):
    """vals (schedules, seeds): mean over a seed's schedules, then mean +- 95% interval over seeds."""
    with warnings.catch_warnings():                              # a metric that applies to none of a seed's videos is nan
        warnings.simplefilter("ignore", RuntimeWarning)
        v = np.nanmean(np.array(vals, dtype=float), axis=0)
    v = v[~np.isnan(v)]
    half = 1.96 * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return dict(mean=float(v.mean()) if len(v) else float("nan"), ci95=float(half))


def markdown(result, seeds, switch):
    lines = []
    for grp in next(iter(result.values())):
        lines += [f"\n**{grp} schedules** (seeds {seeds[0]}-{seeds[-1]}, switch cache {switch}; mean +- 95% interval "
                  f"over seeds, pooled over the training seeds of a row; latency over the n switches that reacted)\n",
                  "| checkpoint | " + " | ".join(METRICS) + " | n |", "|---|" + "---:|" * (len(METRICS) + 1)]
        lines += [f"| {p} | " + " | ".join(f"{r[grp][k]['mean']:.3f} +- {r[grp][k]['ci95']:.3f}" for k in METRICS)
                  + f" | {r[grp]['n_react']['total']:.0f} |" for p, r in result.items()]
    return "\n".join(lines)


def evaluate(cfg, device):
    paths = [p for p in (cfg.ckpts or cfg.ckpt).split(",") if p]
    gens = [load_generator(p, device, cfg.weights) for p in paths]
    schedules = eval_schedules(cfg, gens[0].stream["window"])
    check_eval(cfg, gens, schedules)
    seeds = list(range(cfg.first_seed, cfg.first_seed + cfg.seeds))
    pooled = {}                                                  # row -> (group, metric) -> [(schedules, seeds)]
    for path, g in zip(paths, gens):
        row = re.sub(r"_s\d+(\.pt)$", r"\1", path) if cfg.pool else path   # NAME_s1.pt -> NAME.pt
        for key, vals in score(g, schedules, seeds, cfg.switch_cache).items():
            pooled.setdefault(row, {}).setdefault(key, []).append(np.array(vals, dtype=float))
    result = {row: {} for row in pooled}
    for row, per in pooled.items():
        for (grp, k), vals in per.items():
            vals = np.concatenate(vals, axis=1)                  # (schedules, seeds x training seeds)
            result[row].setdefault(grp, {})[k] = interval(vals) if k != "n_react" else dict(total=float(np.nansum(vals)))
    text = markdown(result, seeds, cfg.switch_cache)
    print(text)
    if cfg.md:
        with open(cfg.md, "a") as f:                             # appends: one file can collect several runs
            f.write(text + "\n")
        print(f"appended the tables to {cfg.md}")
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(dict(schedules=schedules, seeds=seeds, results=result), f, indent=1)
        print(f"wrote {cfg.json}")
    return result


def check_frames(frames, chunk):
    if frames <= 0:
        raise BadInput(f"--frames must be a positive number of frames, not {frames}")
    if frames % chunk:
        raise BadInput(f"--frames={frames} must be a multiple of the generator's chunk of {chunk} frames")


# ----------------------------------------------------------------------------- live steering in the terminal

KEYS = {b"\x1b[A": "up", b"\x1b[B": "down", b"\x1b[C": "right", b"\x1b[D": "left",   # arrows, and the same
        b"\x1bOA": "up", b"\x1bOB": "down", b"\x1bOC": "right", b"\x1bOD": "left",   # in application mode
        b" ": "stay", b"q": "quit", b"Q": "quit"}


def read_keys(fd):
    """The names of the keys waiting on fd, without blocking (select with a zero timeout)."""
    import select
    data = b""
    while select.select([fd], [], [], 0)[0]:
        got = os.read(fd, 64)
        if not got:                                              # the terminal went away: stop
            return ["quit"]
        data += got
    names, i = [], 0
    while i < len(data):
        seq = next((k for k in KEYS if data.startswith(k, i)), None)
        names += [KEYS[seq]] if seq else []
        i += len(seq) if seq else 1
    return names


def ansi_frame(a):
    """(H,W,3) uint8 -> ANSI truecolor half-blocks: each character cell shows two pixel rows,
    the upper one as the foreground colour of '▀' and the lower one as its background."""
    rows = []
    for top, bot in zip(a[0::2], a[1::2]):
        rows.append("".join(f"\x1b[38;2;{t[0]};{t[1]};{t[2]}m\x1b[48;2;{b[0]};{b[1]};{b[2]}m▀"
                            for t, b in zip(top.tolist(), bot.tolist())) + "\x1b[0m")
    return "\r\n".join(rows)


@contextlib.contextmanager
def terminal(fd):
    """cbreak mode (keys arrive one at a time, unechoed; Ctrl-C still interrupts), the alternate
    screen and a hidden cursor, all restored on every way out: q, Ctrl-C, an exception, SIGTERM,
    SIGHUP (a dropped SSH link). Works over plain SSH and in tmux: only the tty and ANSI codes."""
    import signal
    import termios
    import tty
    saved = termios.tcgetattr(fd)
    handlers = {s: signal.signal(s, lambda n, f: sys.exit(128 + n)) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        tty.setcbreak(fd)
        sys.stdout.write("\x1b[?1049h\x1b[?25l\x1b[2J")
        sys.stdout.flush()
        yield
    finally:
        try:                                                     # the tty first: the writes below can fail
            termios.tcsetattr(fd, termios.TCSAFLUSH, saved)      # (SIGHUP); FLUSH drops unread keys
            for s, h in handlers.items():
                signal.signal(s, h)
        finally:
            sys.stdout.write("\x1b[0m\x1b[?25h\x1b[?1049l")
            sys.stdout.flush()


@torch.no_grad()
def live(cfg, g, device):
    """Stream generated frames to the terminal as they are made; the arrow keys switch the
    event (from the next chunk, as a schedule does); q quits and saves the session to --out.
    The session is kept at native resolution (3 KB a frame at 32 x 32) and written at the end."""
    event = parse_schedule(cfg.events, 1 << 30)[0][0]            # start with the schedule's first event
    writer = open_writer(cfg.out)                                # fails now if --out cannot be written
    S, ch, fd = g.world.size, g.chunk, sys.stdin.fileno()
    gen = torch.Generator().manual_seed(cfg.seed)                # every draw of the session: one seed, one session
    cache, session, times, shown = KVCache(g.stream["n_sink"], g.stream["n_window"]), [], [], time.perf_counter()
    try:
        with terminal(fd):
            try:
                while True:
                    keys = read_keys(fd)
                    if "quit" in keys:
                        break
                    event = EVENTS.index(keys[-1]) if keys else event
                    t = time.perf_counter()
                    ev = torch.full((1, ch), event, device=device)
                    with autocast(device):
                        x = rollout(g.model, torch.randn(1, ch, 3, S, S, generator=gen).to(device), ev, g.stream["sigmas"],
                                    ch, cache, switch=cfg.switch_cache, gen=gen).float().cpu()   # .cpu() syncs
                    times.append(time.perf_counter() - t)
                    rate = ch * len(times[1:]) / max(sum(times[1:]), 1e-9)
                    for a in to_rgb(x[0], scale=1):                      # (S,S,3) uint8 each
                        session.append(a)
                        shown = max(shown + (1 / cfg.fps if cfg.fps > 0 else 0), time.perf_counter())
                        time.sleep(max(0.0, shown - time.perf_counter()))   # the --fps cap
                        sys.stdout.write("\x1b[H" + ansi_frame(a.repeat(2, 0).repeat(2, 1)) + "\x1b[0m\r\n"
                                         f"frame {len(session)} | event {EVENTS[event]} | generating {rate:.0f} frames/s"
                                         " | arrows: steer, space: stay, q: quit and save\x1b[K")
                        sys.stdout.flush()
            except KeyboardInterrupt:                            # Ctrl-C: like q
                pass
    finally:
        for a in session:
            writer.append_data(a.repeat(8, 0).repeat(8, 1))          # 8x, nearest-neighbour
        writer.close()
    steady = times[1:] or times or [float("nan")]
    print(f"{len(session)} frames -> {cfg.out} | {ch * len(steady) / sum(steady):.1f} frames/s generated "
          f"| first chunk {times[0] * 1000 if times else float('nan'):.1f} ms | device {device}")


def check_sample(cfg):
    """Every check of sample.py's flags that needs no checkpoint, before any work."""
    if cfg.switch_cache not in ("recache", "keep", "clear"):
        raise BadInput(f"--switch_cache must be recache, keep or clear, not {cfg.switch_cache!r}")
    if cfg.weights not in ("ema", "model"):
        raise BadInput(f"--weights must be ema or model, not {cfg.weights!r}")
    if cfg.live and not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise BadInput("--live needs a terminal on stdin and stdout (run it in a terminal, over ssh -t, or in tmux)")
    if cfg.fps < 0:
        raise BadInput(f"--fps must be 0 (no cap) or positive, not {cfg.fps}")


def main(cfg):
    check_sample(cfg)
    device = pick_device(cfg.device)
    if cfg.eval:                                                 # many checkpoints, short videos: eager
        return evaluate(cfg, device)
    if cfg.serve:
        import serve
        return serve.main(cfg, device)
    g = load_generator(cfg.ckpt, device, cfg.weights)
    if not cfg.live:
        check_frames(cfg.frames, g.chunk)
        parse_schedule(cfg.events, cfg.frames)
    # one long stream of static shapes: compiled, it replays as a CUDA graph (mode reduce-overhead)
    compile_(g.model, cfg.compile and device.type == "cuda", mode="reduce-overhead", dynamic=False)
    return live(cfg, g, device) if cfg.live else sample_one(cfg, g, device)


if __name__ == "__main__":
    cli(main, SampleConfig, PRESETS)
