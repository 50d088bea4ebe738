"""The toy event world: clips, schedules, rendering, and the ground-truth tracker and metrics.

It stands in for real video plus text prompts. A square sprite of colour `c` moves on an
`S x S` torus over a background `b`; the active event (the "prompt", or the action of an
interactive world model) sets its velocity. `b` and `c` never change, so any change of them is a
consistency failure we can measure exactly.

Teacher clips carry one event per frame, and about half of them switch event once, at a chunk
boundary, as the data of an interactive world model does (game footage whose actions change).
If every clip held one event, the event would be redundant once one frame of history exists,
and every model in the chain would learn to continue the motion it sees and ignore the event.

The knob `rho` plants the paper's conditional bias on purpose: the sprite has the canonical
colour of the clip's *first* event with probability `rho`. A teacher window that lies wholly
after a switch sees only the new event and expects its colour, whatever colour the sprite had:
condition-aligned but trajectory-agnostic guidance, the failure Delta Forcing targets.

    python world.py            # writes out/world.gif (example clips), prints step sizes for each palette
"""
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from config import BadInput

EVENTS = ["right", "left", "down", "up", "stay"]              # index = event id; id len(EVENTS) is the null event (CFG)
DIRS = torch.tensor([[0, 1], [0, -1], [1, 0], [-1, 0], [0, 0]])  # (row, col) step of each event
HUES = torch.tensor([[1., -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]])   # red, green, blue, yellow
PALETTES = {"saturated": HUES, "band": 0.6 + 0.2 * HUES}      # sprite colours: see World.palette
COLOR_NAMES = ["red", "green", "blue", "yellow"]
CANON = [0, 2, 3, 1, -1]                                      # right=red, left=blue, down=yellow, up=green, stay=none
BACKGROUNDS = torch.tensor([[-.6, -.6, -.6], [-.6, 0., 0.], [0., -.6, 0.]])  # dark grey, dim teal, dim purple
PULL = 0.2   # `pull`: a segment's mean sprite colour moved this far toward a colour (half the band's 0.4 hue step)


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


def load_world(d):
    """The World of a checkpoint's `world` dict; those written before the band palette hold none:
    theirs was saturated."""
    return World(**{"palette": "saturated", **d})


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
    """Ground-truth videos for per-frame events ev (B,T). Returns frames (B,T,3,S,S) and the
    sprite and background palette indices. With `rho`, the colour is the first event's canonical
    colour with probability rho, else uniform (the planted conditional bias)."""
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
    """The median size ||x_t - x_{t-1}|| of a transition in real clips: a constant of the data
    (drawn from a fixed seed, never from a run's), which Delta Forcing uses as its unit of motion
    (in a latent model, the median latent frame delta). In pixel space one step's size depends on
    the sprite/background contrast: moving steps span 0.87 m to 1.35 m over the palette."""
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
    """Every ordered pair (old, new) of distinct events among the first n (4: the moving ones)."""
    return [(a, b) for a in range(n) for b in range(n) if a != b]


def eval_events(n, T, chunk):
    """The teacher's evaluation clips: n one-event clips (events cycling) and n switch clips
    (every ordered pair cycling, the switch at the chunk boundary nearest the middle). -> (n,T) x 2."""
    one = (torch.arange(n) % len(EVENTS))[:, None].expand(n, T)
    pairs, mid = ordered_pairs(), round(T / 2 / chunk) * chunk
    sw = torch.tensor([[pairs[i % len(pairs)][t >= mid] for t in range(T)] for i in range(n)])
    return one, sw


def clip_scores(x, one, sw, w, first, chunk):
    """Scores of the evaluation clips x = [one-event ; switch] (2n,T,...): follow, valid, jumps,
    canon on the one-event clips; react, latency, identity, bias, pull (and their valid) on the switches."""
    n = len(one)
    m1 = summarize(batch_metrics(x[:n], one, w, first=first, chunk=chunk))
    m2 = summarize(batch_metrics(x[n:], sw, w, first=first, chunk=chunk))
    out = {k: m1[k] for k in ("follow", "valid", "jumps", "canon")}
    out.update({k: m2[k] for k in ("react", "latency", "identity", "bias", "pull")}, switch_valid=m2["valid"])
    return out


def switches(ev):
    """Frames where the event changes: list of (frame, old_event, new_event)."""
    ev = [int(e) for e in ev]
    return [(t, ev[t - 1], ev[t]) for t in range(1, len(ev)) if ev[t] != ev[t - 1]]


# ----------------------------------------------------------------------------- tracker

def _n_blobs(mask):
    """Number of 4-connected components of a boolean (S,S) numpy mask on the torus."""
    S = mask.shape[0]
    seen, n = np.zeros_like(mask), 0
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        n, stack = n + 1, [(r0, c0)]
        seen[r0, c0] = True
        while stack:
            r, c = stack.pop()
            for rr, cc in ((r + 1) % S, c), ((r - 1) % S, c), (r, (c + 1) % S), (r, (c - 1) % S):
                if mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
    return n


def track(video, w):
    """No learned model: per frame, background = median colour; sprite mask = pixels far from it;
    sprite colour = the mean of its core (the pixels farthest from the background) snapped to the
    palette; position = circular (torus) mean of the mask.
    video (T,3,S,S) -> dict of numpy arrays over T."""
    v = video.detach().float().cpu().clamp(-1, 1)
    T, S = v.shape[0], w.size
    flat = v.flatten(2)                                              # (T,3,S*S)
    bg = flat.median(-1).values                                      # (T,3)
    dist = (flat - bg[..., None]).norm(dim=1)                        # (T,S*S) each pixel's distance from it
    mask = dist > 0.6
    area = mask.sum(-1)
    core = mask & (dist >= 0.8 * dist.max(-1, keepdim=True).values)  # not the rim a blur mixes with the background
    color = (flat * core[:, None]).sum(-1) / core.sum(-1).clamp(min=1)[:, None]   # (T,3)
    ang = torch.arange(S) * (2 * math.pi / S)
    rows, cols = ang.repeat_interleave(S), ang.repeat(S)             # angle of each pixel, (S*S,)
    m = mask.float()
    pos = torch.stack([torch.atan2(m @ a.sin(), m @ a.cos()) for a in (rows, cols)], -1) * (S / (2 * math.pi))
    ok = (area >= 0.5 * w.sprite ** 2) & (area <= 2 * w.sprite ** 2)
    masks = mask.view(T, S, S).numpy()
    valid = np.array([bool(ok[t]) and _n_blobs(masks[t]) == 1 for t in range(T)])
    return dict(valid=valid, pos=pos.numpy() % S, area=area.numpy(), color=color.numpy(), bg=bg.numpy(),
                color_id=torch.cdist(color, w.colors).argmin(-1).numpy(),
                bg_id=torch.cdist(bg, BACKGROUNDS).argmin(-1).numpy())


# ----------------------------------------------------------------------------- metrics

def turned(d, old, new, speed):
    """Did the sprite turn? d (n,2): its displacements over the first chunk after a switch.
    Their mean must point closer to the new event's velocity than to the old one's (to `stay`:
    move slower than half the speed). Not the exact speed: "never turns" is not "turns slowly"."""
    if len(d) == 0:
        return False
    mean = d.mean(0)
    if EVENTS[new] == "stay":
        return bool(np.linalg.norm(mean) < speed / 2)
    v_new, v_old = DIRS[new].numpy() * speed, DIRS[old].numpy() * speed
    return bool(np.linalg.norm(mean - v_new) < np.linalg.norm(mean - v_old))


def segments(valid, sw, T):
    """Per switch (f, old, new) of a T-frame video: the valid frames of the segment before it and
    of the segment it starts -> [(before, after)]."""
    b = [0] + [f for f, _, _ in sw] + [T]
    return [([t for t in range(b[i], b[i + 1]) if valid[t]], [t for t in range(b[i + 1], b[i + 2]) if valid[t]])
            for i in range(len(sw))]


def look(tr, frames):
    """A segment's appearance: its most frequent (sprite colour id, background id) over frames."""
    return np.bincount(tr["color_id"][frames]).argmax(), np.bincount(tr["bg_id"][frames]).argmax()


def video_metrics(video, ev, w, first=1, grace=2, tol=0.5, chunk=2):
    """Exact world metrics of one video (T,3,S,S) generated under per-frame events ev (T,).
    `first`: transitions into frames before it are not scored (the first chunk of a stream).
    `react` looks at the first `chunk` frames after each switch; `latency` counts only the
    switches that reacted (`n_react` of them). Returns floats; nan where a metric does not apply."""
    tr, ev = track(video, w), np.asarray(ev)
    T, S = len(ev), w.size
    d = (np.diff(tr["pos"], axis=0) + S / 2) % S - S / 2             # (T-1,2) torus displacement into frame t
    want = DIRS[ev[1:]].numpy() * w.speed
    pair = tr["valid"][1:] & tr["valid"][:-1]
    match = pair & (np.abs(d - want).max(-1) <= tol)                 # (T-1,) match[t-1]: transition into t
    sw = switches(ev)
    bounds = [0] + [f for f, _, _ in sw] + [T]
    scored = np.arange(1, T) >= first
    for f, _, _ in sw:
        scored &= ~((np.arange(1, T) >= f) & (np.arange(1, T) < f + grace))
    lat, ident, bias, pull, react = [], [], [], [], []
    for i, (f, old, new) in enumerate(sw):
        end = bounds[i + 2]
        first_chunk = [t - 1 for t in range(f, min(f + chunk, end)) if pair[t - 1]]   # transitions into f..f+chunk-1
        react.append(float(turned(d[first_chunk], old, new, w.speed)))
        hits = [t for t in range(f, end - 1) if match[t - 1] and match[t]]
        if react[-1]:
            lat.append(hits[0] - f if hits else end - f)
        before, after = segments(tr["valid"], sw, T)[i]
        if not before or not after:
            ident.append(0.0)
            continue
        ref = look(tr, before)
        ident.append(float(all((tr["color_id"][t], tr["bg_id"][t]) == ref for t in after)))
        if CANON[new] >= 0 and ref[0] != CANON[new]:              # could the teacher's bias show here?
            bias.append(float(np.bincount(tr["color_id"][after]).argmax() == CANON[new]))
        c, b, a = (w.colors[CANON[new]].numpy(), tr["color"][before].mean(0), tr["color"][after].mean(0))
        if CANON[new] >= 0 and np.linalg.norm(b - c) >= PULL:      # the same, on mean colours: no palette snap
            pull.append(float(np.linalg.norm(a - c) <= np.linalg.norm(b - c) - PULL))
    seg0 = [t for t in range(bounds[1]) if tr["valid"][t]]
    tail = [t for t in range(T - max(2, T // 8), T) if tr["valid"][t]]
    if seg0 and tail:   # colour distance normalised by the palette cube's diagonal, in [0, 1]
        drift = sum(np.linalg.norm(tr[k][seg0].mean(0) - tr[k][tail].mean(0)) for k in ("bg", "color")) / (4 * math.sqrt(3))
    else:
        drift = 1.0
    canon = CANON[ev[0]]
    return dict(
        follow=float(match[scored].mean()) if scored.any() else float("nan"),
        react=float(np.mean(react)) if react else float("nan"),
        latency=float(np.mean(lat)) if lat else float("nan"),
        n_react=float(sum(react)),
        identity=float(np.mean(ident)) if ident else float("nan"),
        jumps=float((np.abs(d[pair]).max(-1) > w.speed + 1).mean()) if pair.any() else float("nan"),
        valid=float(tr["valid"].mean()),
        drift=float(drift),
        canon=float(np.bincount(tr["color_id"][seg0]).argmax() == canon) if seg0 and canon >= 0 else float("nan"),
        bias=float(np.mean(bias)) if bias else float("nan"),     # switches recoloured to the new event's canonical colour
        pull=float(np.mean(pull)) if pull else float("nan"),     # switches whose colour moved PULL toward it
    )


def batch_metrics(videos, ev, w, **kw):
    """videos (B,T,3,S,S), ev (B,T) -> per-video metric lists {name: [float]}."""
    rows = [video_metrics(v, e, w, **kw) for v, e in zip(videos, ev)]
    return {k: [r[k] for r in rows] for k in rows[0]}


def summarize(per_video):
    """Mean of each metric over videos, ignoring nan (metrics that did not apply)."""
    return {k: float(np.nanmean(v)) if not np.all(np.isnan(v)) else float("nan") for k, v in per_video.items()}


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
