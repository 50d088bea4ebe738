"""The toy event world: clips, schedules and rendering (its exact metrics: metrics.py).

It stands in for real video plus text prompts: a square sprite of colour `c` moves on an `S x S`
torus over a background `b`, and the active event (the "prompt", or a world model's action) sets
its velocity. `b` and `c` never change, so any change of them is an exactly measurable failure.

Teacher clips carry one event per frame, and about half switch event once, at a chunk boundary,
as game footage's actions do: were every clip one event, the event would be redundant once one
frame of history exists, and every model would learn to continue the motion and ignore it.

`rho` plants the paper's conditional bias, the failure Delta Forcing targets: the sprite has the
canonical colour of the clip's *first* event with probability `rho`, so a teacher window wholly
after a switch expects the new event's colour, whatever the sprite's (trajectory-agnostic guidance).

    python world.py            # writes out/world.gif (example clips), prints step sizes for each palette
"""
import math
import os
from dataclasses import dataclass

import torch

from config import BadInput

EVENTS = ["right", "left", "down", "up", "stay"]              # index = event id; id len(EVENTS) is the null event (CFG)
DIRS = torch.tensor([[0, 1], [0, -1], [1, 0], [-1, 0], [0, 0]])  # (row, col) step of each event
HUES = torch.tensor([[1., -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]])   # red, green, blue, yellow
PALETTES = {"saturated": HUES, "band": 0.6 + 0.2 * HUES}      # sprite colours: see World.palette
COLOR_NAMES = ["red", "green", "blue", "yellow"]
CANON = [0, 2, 3, 1, -1]                                      # right=red, left=blue, down=yellow, up=green, stay=none
BACKGROUNDS = torch.tensor([[-.6, -.6, -.6], [-.6, 0., 0.], [0., -.6, 0.]])  # dark grey, dim teal, dim purple


@dataclass
class World:
    size: int = 16     # S, frame side in pixels
    sprite: int = 4    # s, sprite side in pixels
    speed: int = 2     # pixels per frame: at 1 a step is a quarter of a 4-pixel token (python world.py)
    rho: float = 0.9   # P(sprite colour = the first event's canonical colour) in teacher clips
    # band: bright hues that differ by small offsets (0.6 +- 0.2), so a recolour is small in L2 against
    # the sprite on the background and a band of noise levels hides the colour but not the position,
    # as coarse layout outlives identity in real video; saturated: +-1, a recolour larger than a step
    palette: str = "band"

    @property
    def colors(self):
        """(4,3) the sprite palette, in COLOR_NAMES order."""
        return PALETTES[self.palette]


# ----------------------------------------------------------------------------- rendering

def render(pos, color, bg, size, sprite):
    """pos (B,T,2) long, color (B,3), bg (B,3) -> frames (B,T,3,S,S) in [-1, 1], wrapping on the torus."""
    ar = torch.arange(size)
    rows = ((ar - pos[..., 0:1]) % size) < sprite                    # (B,T,S)
    cols = ((ar - pos[..., 1:2]) % size) < sprite                    # (B,T,S)
    mask = (rows[..., :, None] & cols[..., None, :]).unsqueeze(2)    # (B,T,1,S,S)
    return torch.where(mask, color[:, None, :, None, None], bg[:, None, :, None, None])


def trajectory(pos0, ev, speed, size):
    """pos0 (B,2), ev (B,T) event per frame -> pos (B,T,2): p[t] = p[t-1] + speed * dir(e[t]) mod S."""
    step = DIRS[ev] * speed                                          # (B,T,2)
    step[:, 0] = 0                                                   # frame 0 sits at pos0
    return (pos0[:, None] + step.cumsum(1)) % size


def sample_videos(w, ev, gen, rho=None):
    """Ground-truth videos for per-frame events ev (B,T) -> frames (B,T,3,S,S), sprite and background
    palette indices. With `rho`, the colour is the first event's canonical one with probability rho."""
    B = ev.shape[0]
    color = torch.randint(len(w.colors), (B,), generator=gen)
    if rho is not None:
        canon = torch.tensor(CANON)[ev[:, 0]]
        biased = (torch.rand(B, generator=gen) < rho) & (canon >= 0)
        color = torch.where(biased, canon, color)
    bg = torch.randint(len(BACKGROUNDS), (B,), generator=gen)
    pos0 = torch.randint(w.size, (B, 2), generator=gen)
    pos = trajectory(pos0, ev, w.speed, w.size)
    return render(pos, w.colors[color], BACKGROUNDS[bg], w.size, w.sprite), color, bg


def random_events(B, T, chunk, gen, p_switch=0.5, max_switches=1, first=None):
    """Per-frame events (B,T), drawn per video: each starts with a random event and, with
    probability p_switch, switches 1..max_switches times at distinct chunk boundaries at or
    after `first` (default: the first chunk boundary); a switch always changes the event."""
    first = chunk if first is None else first
    bounds = torch.arange(first, T, chunk)
    ev = torch.empty(B, T, dtype=torch.long)
    for b in range(B):
        cur = int(torch.randint(len(EVENTS), (), generator=gen))
        n = int(torch.randint(1, max_switches + 1, (), generator=gen)) if len(bounds) else 0
        n = n if float(torch.rand((), generator=gen)) < p_switch else 0
        at = bounds[torch.randperm(len(bounds), generator=gen)[:n]].sort().values.tolist()
        start = 0
        for a in at + [T]:
            ev[b, start:a] = cur
            cur = (cur + int(torch.randint(1, len(EVENTS), (), generator=gen))) % len(EVENTS)
            start = a
    return ev


def teacher_batch(w, B, T, gen, chunk=2, p_switch=0.5):
    """Teacher clips: per-frame events, about half switching once at a chunk boundary.
    -> x (B,T,3,S,S), event (B,T)."""
    event = random_events(B, T, chunk, gen, p_switch)
    x, _, _ = sample_videos(w, event, gen, rho=w.rho)
    return x, event


def natural_step(w, T, chunk, n=2048):
    """The median size ||x_t - x_{t-1}|| of a transition in real clips, Delta Forcing's unit of motion
    (in a latent model, the median latent frame delta): a constant of the data, from a fixed seed."""
    x, _ = teacher_batch(w, n, T, torch.Generator().manual_seed(0), chunk)
    return float((x[:, 1:] - x[:, :-1]).flatten(2).norm(dim=-1).median())


# ----------------------------------------------------------------------------- schedules

def parse_schedule(text, frames):
    """'right@0,up@24,left@48' -> [(event_id, start_frame), ...]. Raises BadInput with one clear line."""
    out = []
    for item in str(text).split(","):
        name, at, start = item.strip().partition("@")
        if not at or not name:
            raise BadInput(f"malformed schedule item {item.strip()!r} in {text!r}; expected EVENT@FRAME, e.g. right@0,up@24")
        if name not in EVENTS:
            raise BadInput(f"unknown event {name!r} in schedule {text!r}; events are {', '.join(EVENTS)}")
        if not start.strip().isdigit():
            raise BadInput(f"schedule item {item.strip()!r}: frame must be a non-negative integer")
        out.append((EVENTS.index(name), int(start)))
    if out[0][1] != 0:
        raise BadInput(f"schedule {text!r} must start at frame 0")
    for (_, a), (_, b) in zip(out, out[1:]):
        if b <= a:
            raise BadInput(f"schedule {text!r}: switch frames must increase ({b} after {a})")
    if out[-1][1] >= frames:
        raise BadInput(f"schedule {text!r}: switch at frame {out[-1][1]} is past the end of a {frames}-frame video")
    return out


def schedule_events(schedule, frames, chunk):
    """-> (T,) long event per frame. A switch takes effect at the next chunk boundary."""
    ev = torch.empty(frames, dtype=torch.long)
    for e, start in schedule:
        ev[math.ceil(start / chunk) * chunk:] = e
    return ev


def ordered_pairs(n=len(EVENTS)):
    """Every ordered pair (old, new) of distinct events among the first n (all five by default; 4: the moving ones)."""
    return [(a, b) for a in range(n) for b in range(n) if a != b]


def eval_events(n, T, chunk):
    """The teacher's evaluation clips: n one-event clips (events cycling) and n switch clips
    (every ordered pair cycling, the switch at the chunk boundary nearest the middle). -> (n,T) x 2."""
    one = (torch.arange(n) % len(EVENTS))[:, None].expand(n, T)
    pairs, mid = ordered_pairs(), round(T / 2 / chunk) * chunk
    sw = torch.tensor([[pairs[i % len(pairs)][t >= mid] for t in range(T)] for i in range(n)])
    return one, sw


def to_rgb(frames, scale=8):
    """frames (T,3,H,W) in [-1,1] -> (T,H*scale,W*scale,3) uint8 numpy, nearest-upscaled."""
    a = ((frames.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
    return a.repeat_interleave(scale, -1).repeat_interleave(scale, -2).permute(0, 2, 3, 1).numpy()


def save_video(path, frames, fps=8, scale=8):
    """frames (T,3,S,S) or (T,3,S,W) in [-1,1] -> GIF or MP4 (by suffix), nearest-upscaled."""
    import imageio.v2 as imageio
    a = to_rgb(frames, scale)                                        # (T,H,W,3)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if path.endswith(".mp4"):
        imageio.mimwrite(path, list(a), fps=fps, macro_block_size=1)
    else:
        imageio.mimwrite(path, list(a), duration=1000 / fps, loop=0)


def save_strip(path, videos, scale=8):
    """Videos (N,T,3,S,S) in [-1,1] -> one PNG, a video per row, its frames left to right."""
    import imageio.v2 as imageio
    grid = torch.cat([torch.cat(list(v), -1) for v in videos], -2)   # (3, N*S, T*S)
    a = to_rgb(grid[None], scale)[0]                                 # (N*S*scale, T*S*scale, 3)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    imageio.imwrite(path, a)


def step_sizes(w):
    """L2 sizes, in pixel space, of what a model must see: one step of motion at speeds 1 and 2,
    and a recolour of the sprite (the conditional bias). Printed by `python world.py`."""
    pos = torch.tensor([[[4, 4], [4, 4 + 1], [4, 4 + 2]]])           # (1,3,2): still, 1 px right, 2 px right
    red, blue, bg = w.colors[0:1], w.colors[2:3], BACKGROUNDS[0:1]
    x = render(pos, red, bg, w.size, w.sprite)[0]                     # (3,3,S,S)
    recolour = render(pos[:, :1], blue, bg, w.size, w.sprite)[0, 0] - x[0]
    return {"speed 1": float((x[1] - x[0]).norm()), "speed 2": float((x[2] - x[0]).norm()),
            "recolour": float(recolour.norm())}


if __name__ == "__main__":
    w, gen = World(), torch.Generator().manual_seed(0)
    x, event = teacher_batch(w, 6, 16, gen, chunk=2)                  # six teacher clips, about half switching
    save_video("out/world.gif", torch.cat(list(x), -1))              # (T,3,S,6*S): clips side by side
    print("clip events:", [" ".join(EVENTS[e] for e in ev[::2]) for ev in event.tolist()], "-> out/world.gif")
    for p in PALETTES:
        wp = World(palette=p)
        m = natural_step(wp, 8, 2)
        steps = [float((c - b).norm()) * (2 * wp.sprite * wp.speed) ** 0.5 for c in wp.colors for b in BACKGROUNDS]
        print(f"{p} palette: L2 size of a step and of a recolour:", {k: round(v, 2) for k, v in step_sizes(wp).items()})
        print(f"  natural step m (median transition of teacher clips, speed {wp.speed}): {m:.2f}; one 2-pixel step "
              f"over every sprite and background colour: {min(steps) / m:.2f} m to {max(steps) / m:.2f} m "
              "(the continuity radius must admit the largest)")
