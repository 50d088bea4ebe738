"""Streaming interactive generation from any generator checkpoint: a video file, or live in the terminal.

    python sample.py --ckpt=out/longtune.pt --events=right@0,up@24,left@48 --frames=96 --out=out/sample.gif
    python sample.py --live --ckpt=out/deltaforcing.pt        # steer it with the arrow keys, q quits

Generation streams chunk by chunk through the KV cache (sink + rolling window), each chunk going
to the GIF/MP4 writer as it comes, so memory stays constant for any length. One stepper, Player,
makes every chunk here, in the web page and in the benchmark (tools/). Each video's noise (initial and re-noising) comes from its
own generator seeded by its own seed, so a video never depends on which others share its batch.
"""
import contextlib
import os
import re
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from common import autocast, compile_, load_checkpoint, pick_device
from config import BadInput, Config, Count, NonNegative, OneOf, SwitchCache, cli
from model import build
from streaming import KVCache, rollout
from world import EVENTS, World, parse_schedule, schedule_events, to_rgb


@dataclass
class SampleConfig(Config):
    ckpt: str = "out/longtune.pt"  # a generator checkpoint (distill.py's student or longtune.py's)
    weights: OneOf("ema", "model") = "ema"   # ema | model (the raw weights)
    events: str = "right@0,up@24,left@48"   # the schedule: EVENT@FRAME,... (--live: starts with the first event)
    frames: Count = 96             # video length
    out: str = "out/sample.gif"    # a .gif or .mp4 (and a PNG strip beside it); --live: the session
    switch_cache: SwitchCache = "recache_window"   # at every event switch: recache_window | recache | keep | clear
    live: bool = False             # stream to the terminal; arrow keys switch the event, q quits and saves --out
    fps: NonNegative = 24.0        # --live: frames/s shown (0 = as fast as they are generated)
    compile: bool = True           # CUDA only: the streaming step as a CUDA graph


PRESETS = {"tiny": {}, "small": {}}


@dataclass
class StreamModel:
    """A causal generator loaded for streaming: the network, how it streams, and its world."""
    model: torch.nn.Module
    stream: dict                   # chunk, sigmas, n_sink, n_window, window (the teacher's clip length)
    world: World

    @property
    def chunk(self):
        return self.stream["chunk"]


def load_generator(path, device, weights="ema"):
    """Any causal generator checkpoint (student or long-tuned) -> StreamModel."""
    ck = load_checkpoint(path, ["student", "longtune"], "python distill.py (or python longtune.py)")
    return StreamModel(build(ck["model_args"], ck[weights], device).eval(), ck["stream"], World(**ck["world"]))


class Player:
    """Videos streaming chunk by chunk: one KV cache, one noise generator per video (seeded by
    its own seed, and nothing else), and next_chunk(event) under per-video events."""

    def __init__(self, g, seeds, switch="recache_window"):
        self.g, self.switch, self.device = g, switch, next(g.model.parameters()).device
        self.noise_gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.cache = KVCache(g.stream["n_sink"], g.stream["n_window"])

    @torch.no_grad()
    def next_chunk(self, event):
        """event (B,chunk) -> the next chunk (B,chunk,3,S,S), float, on the device."""
        S, ch = self.g.world.size, self.g.chunk
        noise = torch.stack([torch.randn(ch, 3, S, S, generator=gn) for gn in self.noise_gens]).to(self.device)
        with autocast(self.device):
            return rollout(self.g.model, noise, event.to(self.device), self.g.stream["sigmas"], ch, self.cache,
                           switch=self.switch, gen=self.noise_gens).float()


def generate(g, ev, seeds, switch, on_chunk=None):
    """Stream the videos for per-frame events ev (B,T), video b from seeds[b]. on_chunk(x) sees
    each chunk as it is made (on the CPU). -> the videos (B,T,...), or None with on_chunk."""
    player, outs = Player(g, seeds, switch), []
    for i in range(0, ev.shape[1], g.chunk):                     # rollout chunk by chunk = one long rollout
        (on_chunk or outs.append)(player.next_chunk(ev[:, i:i + g.chunk]).cpu())
    return torch.cat(outs, 1) if outs else None


def schedule_tensor(text, frames, chunk, B, device):
    return schedule_events(parse_schedule(text, frames), frames, chunk)[None].expand(B, frames).to(device)


def open_writer(path):
    """A GIF or MP4 writer that takes frames as they come; an unusable path is one clear line."""
    import imageio.v2 as imageio
    if not path.endswith((".gif", ".mp4")):
        raise BadInput(f"--out must end in .gif or .mp4, not {path!r}")
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        open(path, "ab").close()                                 # fail now, not after generating
        return (imageio.get_writer(path, fps=8, macro_block_size=1) if path.endswith(".mp4")
                else imageio.get_writer(path, duration=125, loop=0))
    except OSError as e:
        raise BadInput(f"cannot write {path}: {e.strerror or e}") from None


def sample_one(cfg, g, device):
    import imageio.v2 as imageio
    ev = schedule_tensor(cfg.events, cfg.frames, g.chunk, 1, device)
    writer = open_writer(cfg.out)
    strip, every, times, t = [], max(1, cfg.frames // 16), [], time.perf_counter()
    def write(x):                                                # (1,chunk,3,S,S) -> frames appended as they come
        nonlocal t
        times.append(time.perf_counter() - t)                    # the chunk's time, up to its copy to the CPU
        for n, a in enumerate(to_rgb(x[0]), g.chunk * (len(times) - 1)):   # n: the frame's index in the video
            writer.append_data(a)
            if n % every == 0 and len(strip) < 16:               # 16 frames, evenly spaced, for the PNG strip
                strip.append(a)
        t = time.perf_counter()
    generate(g, ev, [cfg.seed], cfg.switch_cache, on_chunk=write)
    writer.close()
    png = os.path.splitext(cfg.out)[0] + ".png"
    imageio.imwrite(png, np.concatenate(strip, 1))
    steady = times[1:] or times
    print(f"{cfg.frames} frames -> {cfg.out} and {png} | {g.chunk * len(steady) / sum(steady):.1f} frames/s "
          f"| first chunk {times[0] * 1000:.1f} ms | device {device}")


def check_frames(frames, chunk):
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
    return [KEYS[k] for k in re.findall(b"|".join(map(re.escape, KEYS)), data)]   # other bytes are skipped


def ansi_frame(a):
    """(H,W,3) uint8 -> ANSI truecolor half-blocks: each character cell shows two pixel rows,
    the upper one as the foreground colour of '▀' and the lower one as its background."""
    cell = "\x1b[38;2;{};{};{}m\x1b[48;2;{};{};{}m▀"
    return "\r\n".join("".join(cell.format(*t, *b) for t, b in zip(top.tolist(), bot.tolist())) + "\x1b[0m"
                       for top, bot in zip(a[0::2], a[1::2]))


@contextlib.contextmanager
def terminal(fd):
    """cbreak mode (keys arrive one at a time, unechoed; Ctrl-C still interrupts), the alternate screen
    and a hidden cursor, all restored on every way out: q, Ctrl-C, an exception, SIGTERM, SIGHUP."""
    import signal
    import termios
    import tty
    saved = termios.tcgetattr(fd)
    handlers = {s: signal.signal(s, lambda n, f: sys.exit(128 + n)) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        tty.setcbreak(fd)
        print("\x1b[?1049h\x1b[?25l\x1b[2J", end="", flush=True)
        yield
    finally:
        try:                                                     # the tty first: the writes below can fail
            termios.tcsetattr(fd, termios.TCSAFLUSH, saved)      # (SIGHUP); FLUSH drops unread keys
            for s, h in handlers.items():
                signal.signal(s, h)
        finally:
            print("\x1b[0m\x1b[?25h\x1b[?1049l", end="", flush=True)


@torch.no_grad()
def live(cfg, g, device):
    """Stream frames to the terminal as they are made; the arrow keys switch the event (from the next
    chunk, as a schedule does); q or Ctrl-C quits and saves the session to --out."""
    event = parse_schedule(cfg.events, 1 << 30)[0][0]            # start with the schedule's first event
    writer = open_writer(cfg.out)                                # fails now if --out cannot be written
    ch, fd = g.chunk, sys.stdin.fileno()
    player = Player(g, [cfg.seed], cfg.switch_cache)            # every draw of the session: one seed, one session
    session, times, shown = [], [], time.perf_counter()
    try:
        with terminal(fd), contextlib.suppress(KeyboardInterrupt):   # Ctrl-C: like q
            while "quit" not in (keys := read_keys(fd)):
                event = EVENTS.index(keys[-1]) if keys else event
                t = time.perf_counter()
                x = player.next_chunk(torch.full((1, ch), event)).cpu()   # .cpu() waits for the chunk
                times.append(time.perf_counter() - t)
                rate = ch * len(times[1:]) / max(sum(times[1:]), 1e-9)
                for a in to_rgb(x[0], scale=1):                  # (S,S,3) uint8 each
                    session.append(a)
                    shown = max(shown + (1 / cfg.fps if cfg.fps > 0 else 0), time.perf_counter())
                    time.sleep(max(0.0, shown - time.perf_counter()))   # the --fps cap
                    print("\x1b[H" + ansi_frame(a.repeat(2, 0).repeat(2, 1)) + "\x1b[0m\r\n"
                          f"frame {len(session)} | event {EVENTS[event]} | generating {rate:.0f} frames/s"
                          " | arrows: steer, space: stay, q: quit and save\x1b[K", end="", flush=True)
    finally:
        for a in session:
            writer.append_data(a.repeat(8, 0).repeat(8, 1))          # 8x, nearest-neighbour
        writer.close()
    steady = times[1:] or times or [float("nan")]
    print(f"{len(session)} frames -> {cfg.out} | {ch * len(steady) / sum(steady):.1f} frames/s generated "
          f"| first chunk {times[0] * 1000 if times else float('nan'):.1f} ms | device {device}")


def main(cfg):
    if cfg.live and not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise BadInput("--live needs a terminal on stdin and stdout (run it in a terminal, over ssh -t, or in tmux)")
    device = pick_device(cfg.device, precision=cfg.precision, interactive=True)
    g = load_generator(cfg.ckpt, device, cfg.weights)
    if not cfg.live:
        check_frames(cfg.frames, g.chunk)
        parse_schedule(cfg.events, cfg.frames)
    # one long stream of static shapes: compiled, it replays as a CUDA graph (mode reduce-overhead)
    compile_(g.model, cfg.compile and device.type == "cuda", mode="reduce-overhead", dynamic=False)
    return live(cfg, g, device) if cfg.live else sample_one(cfg, g, device)


if __name__ == "__main__":
    cli(main, SampleConfig, PRESETS)
