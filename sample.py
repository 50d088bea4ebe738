"""Streaming interactive generation from any generator checkpoint, and --eval, the benchmark
(DESIGN section 9).

    python sample.py --ckpt=out/longtune.pt --events=right@0,up@24,left@48 --frames=96 --out=out/sample.gif
    python sample.py --eval --ckpts=out/student.pt,out/longtune.pt --seeds=8 --json=out/eval.json
    python sample.py --live --ckpt=out/deltaforcing.pt        # steer it with the arrow keys, q quits

Generation streams chunk by chunk through the KV cache (sink + rolling window) and hands each
chunk to the GIF/MP4 writer as it comes, so the generator's memory stays constant for any length
(an MP4 is encoded as it goes; a GIF writer keeps its frames until it closes). --eval runs the same
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

import distill
from model import BadInput, KVCache, build, cli, load_checkpoint, maybe_compile, pick_device, rollout
from teacher import autocast
from world import EVENTS, World, batch_metrics, parse_schedule, schedule_events, to_rgb

METRICS = ["follow", "latency", "identity", "jumps", "valid", "drift", "bias"]


@dataclass
class SampleConfig:
    preset: str = "tiny"
    device: str = "auto"
    ckpt: str = "out/longtune.pt"
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
    fps: float = 12.0              # --live: display cap in frames/s (0 = as fast as they are generated)
    compile: bool = True           # CUDA only, generation and --live: the streaming step as a CUDA graph


PRESETS = {"tiny": {}, "small": {}}


def load_generator(path, device):
    """Any causal generator checkpoint (student or long-tuned) -> (model, streaming settings)."""
    ck = load_checkpoint(path, ["student", "longtune"], "python distill.py (or python longtune.py)")
    g = dict(ck["config"])
    g["levels"] = distill.student_levels(distill.DistillConfig(levels=g["levels"], shift=g["shift"]), device)
    g["world"] = World(**{k: ck["teacher_config"][k] for k in ("size", "sprite", "speed", "rho")})
    g["window"] = ck["teacher_config"]["frames"]
    return build(ck, "ema", device).eval(), g


def check_frames(frames, chunk):
    if frames <= 0:
        raise BadInput(f"--frames must be a positive number of frames, not {frames}")
    if frames % chunk:
        raise BadInput(f"--frames={frames} must be a multiple of the generator's chunk of {chunk} frames")


def builtin_schedules(W):
    """(group, schedule, frames) in units of the teacher window W: one switch, several, and long horizons."""
    one = [(a, b) for a, b in (("right", "up"), ("down", "left"), ("left", "down"), ("up", "right"))]
    return ([("switch", f"{a}@0,{b}@{2 * W}", 4 * W) for a, b in one]
            + [("multi", f"right@0,down@{W + W // 2},left@{3 * W},up@{4 * W + W // 2}", 6 * W),
               ("multi", f"up@0,left@{W},down@{2 * W},right@{3 * W},stay@{4 * W}", 6 * W)]
            + [("long", f"left@0,up@{3 * W},right@{6 * W}", 8 * W), ("long", f"down@0,right@{4 * W}", 8 * W),
               ("long", "right@0", 8 * W)])


@torch.no_grad()
def generate(model, g, ev, noise_seed, switch, on_chunk=None):
    """Stream the videos for per-frame events ev (B,T). noise_seed fixes the initial noise per
    video and the re-noising draws. on_chunk(x) sees each chunk as it is made."""
    B, T = ev.shape
    S, ch = g["size"], g["chunk"]
    gens = [torch.Generator().manual_seed(int(s)) for s in noise_seed]
    noise = torch.stack([torch.randn(T, 3, S, S, generator=gn) for gn in gens]).to(ev.device)
    torch.manual_seed(int(noise_seed[0]))
    cache, outs, times = KVCache(g["n_sink"], g["n_window"]), [], []
    for i in range(0, T, ch):                                    # rollout chunk by chunk = one long rollout
        t = time.perf_counter()
        with autocast(ev.device):
            x = rollout(model, noise[:, i:i + ch], ev[:, i:i + ch], g["levels"], ch, cache, switch=switch).float()
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


def sample_one(cfg, model, g, device):
    import imageio.v2 as imageio
    check_frames(cfg.frames, g["chunk"])
    ev = schedule_tensor(cfg.events, cfg.frames, g["chunk"], 1, device)
    writer = open_writer(cfg.out)
    strip, every = [], max(1, cfg.frames // 16)

    def write(x):                                                # (1,chunk,3,S,S) -> frames appended as they come
        for a in to_rgb(x[0]):
            writer.append_data(a)
            if write.n % every == 0 and len(strip) < 16:
                strip.append(a)
            write.n += 1
    write.n = 0
    _, times = generate(model, g, ev, [cfg.seed], cfg.switch_cache, on_chunk=write)
    writer.close()
    png = os.path.splitext(cfg.out)[0] + ".png"
    imageio.imwrite(png, np.concatenate(strip, 1))
    steady = times[1:] or times
    print(f"{cfg.frames} frames -> {cfg.out} and {png} | {g['chunk'] * len(steady) / sum(steady):.1f} frames/s "
          f"| first chunk {times[0] * 1000:.1f} ms | device {device}")


def evaluate(cfg, device):
    paths = [p for p in (cfg.ckpts or cfg.ckpt).split(",") if p]
    gens = [load_generator(p, device) for p in paths]
    chunk, W = gens[0][1]["chunk"], gens[0][1]["window"]
    if cfg.seeds <= 0:
        raise BadInput(f"--seeds must be positive, not {cfg.seeds}")
    for flag, path in (("json", cfg.json), ("md", cfg.md)):
        try:
            open(path, "a").close() if path else None           # fail now, not after the evaluation
        except OSError as e:
            raise BadInput(f"cannot write --{flag}={path}: {e.strerror or e}") from None
    if cfg.schedule_file:
        try:
            items = json.load(open(cfg.schedule_file))
        except (OSError, ValueError) as e:
            raise BadInput(f"cannot read --schedule_file {cfg.schedule_file}: {e}") from None
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise BadInput(f"--schedule_file {cfg.schedule_file} must hold a JSON list of schedule strings")
        check_frames(cfg.frames, chunk)
        schedules = [("file", s, cfg.frames) for s in items]
    else:
        schedules = builtin_schedules(W)
    for _, s, n in schedules:
        parse_schedule(s, n)                                     # every schedule is checked before any work
    seeds = list(range(cfg.first_seed, cfg.first_seed + cfg.seeds))
    result, pooled = {}, {}
    for path, (model, g) in zip(paths, gens):
        row = re.sub(r"_s\d+(\.pt)$", r"\1", path) if cfg.pool else path   # NAME_s1.pt -> NAME.pt
        per = {}                                                 # (group, metric) -> (seeds, schedules) values
        for j, (group, text, n) in enumerate(schedules):
            ev = schedule_tensor(text, n, g["chunk"], len(seeds), device)
            x, _ = generate(model, g, ev, [1000 * j + s for s in seeds], cfg.switch_cache)
            m = batch_metrics(x, ev.cpu(), g["world"], first=g["chunk"])
            for k in METRICS:
                for grp in (group, "all"):
                    per.setdefault((grp, k), []).append(m[k])
        for key, vals in per.items():                            # rows: (schedules, seeds x training seeds)
            pooled.setdefault(row, {}).setdefault(key, []).append(np.array(vals, dtype=float))
    for row, per in pooled.items():
        result[row] = {}
        for (grp, k), vals in per.items():
            vals = np.concatenate(vals, axis=1)
            with warnings.catch_warnings():                      # a metric that applies to none of a seed's videos is nan
                warnings.simplefilter("ignore", RuntimeWarning)
                v = np.nanmean(np.array(vals, dtype=float), axis=0)  # per seed, mean over the group's schedules
            v = v[~np.isnan(v)]
            half = 1.96 * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
            result[row].setdefault(grp, {})[k] = dict(mean=float(v.mean()) if len(v) else float("nan"), ci95=float(half))
    lines = []                                                   # markdown tables, printed and, with --md, saved
    for grp in next(iter(result.values())):
        lines += [f"\n**{grp} schedules** (seeds {seeds[0]}-{seeds[-1]}, switch cache {cfg.switch_cache}; mean +- 95% "
                  f"interval over seeds, pooled over the training seeds of a row)\n",
                  "| checkpoint | " + " | ".join(METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
        lines += [f"| {p} | " + " | ".join(f"{r[grp][k]['mean']:.3f} +- {r[grp][k]['ci95']:.3f}" for k in METRICS) + " |"
                  for p, r in result.items()]
    print("\n".join(lines))
    if cfg.md:
        with open(cfg.md, "a") as f:                             # appends: one file can collect several runs
            f.write("\n".join(lines) + "\n")
        print(f"appended the tables to {cfg.md}")
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(dict(schedules=schedules, seeds=seeds, results=result), f, indent=1)
        print(f"wrote {cfg.json}")
    return result


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
def live(cfg, model, g, device):
    """Stream generated frames to the terminal as they are made; the arrow keys switch the
    event (from the next chunk, as a schedule does); q quits and saves the session to --out.
    The session is kept at native resolution (3 KB a frame at 32 x 32) and written at the end."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise BadInput("--live needs a terminal on stdin and stdout (run it in a terminal, over ssh -t, or in tmux)")
    if cfg.fps < 0:
        raise BadInput(f"--fps must be 0 (no cap) or positive, not {cfg.fps}")
    event = parse_schedule(cfg.events, 1 << 30)[0][0]            # start with the schedule's first event
    writer = open_writer(cfg.out)                                # fails now if --out cannot be written
    S, ch, fd = g["size"], g["chunk"], sys.stdin.fileno()
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    cache, session, times, shown = KVCache(g["n_sink"], g["n_window"]), [], [], time.perf_counter()
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
                        x = rollout(model, torch.randn(1, ch, 3, S, S, generator=gen).to(device), ev, g["levels"],
                                    ch, cache, switch=cfg.switch_cache).float().cpu()   # .cpu() syncs
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
            writer.append_data(a.repeat(4, 0).repeat(4, 1))
        writer.close()
    steady = times[1:] or times or [float("nan")]
    print(f"{len(session)} frames -> {cfg.out} | {ch * len(steady) / sum(steady):.1f} frames/s generated "
          f"| first chunk {times[0] * 1000 if times else float('nan'):.1f} ms | device {device}")


def main(cfg):
    device = pick_device(cfg.device)
    if cfg.switch_cache not in ("recache", "keep", "clear"):
        raise BadInput(f"--switch_cache must be recache, keep or clear, not {cfg.switch_cache!r}")
    if cfg.eval:                                                 # many checkpoints, short videos: eager
        return evaluate(cfg, device)
    model, g = load_generator(cfg.ckpt, device)
    # one long stream of static shapes: compiled, it replays as a CUDA graph (mode reduce-overhead)
    model = maybe_compile(model, cfg.compile and device.type == "cuda", mode="reduce-overhead", dynamic=False)
    return live(cfg, model, g, device) if cfg.live else sample_one(cfg, model, g, device)


if __name__ == "__main__":
    cli(main, SampleConfig, PRESETS)
