"""The world's exact metrics: a tracker that needs no learned model, and the per-video scores.

Every frame is read by `track` (background, sprite mask, colour, position on the torus); a video's
scores compare what was tracked with the events it was generated under (docs/metrics.md defines
each one). All metrics are in [0, 1] except `latency` (frames) and `n_react` (a count).
"""
import math

import numpy as np
import torch

from world import BACKGROUNDS, CANON, DIRS, EVENTS

FREE = 0.2   # `identity_free`: how far sprite colour and background may wander from their look before a switch
PULL = 0.2   # `pull`: a segment's mean sprite colour moved this far toward a colour (half the band's 0.4 hue step)


def switches(ev):
    """Frames where the event changes: list of (frame, old_event, new_event)."""
    ev = [int(e) for e in ev]
    return [(t, ev[t - 1], ev[t]) for t in range(1, len(ev)) if ev[t] != ev[t - 1]]


def _n_blobs(mask):
    """Number of 4-connected components of a boolean (S,S) numpy mask on the torus."""
    S, todo, n = mask.shape[0], set(zip(*np.nonzero(mask))), 0
    while todo:                                                      # flood-fill one component at a time
        n, stack = n + 1, [todo.pop()]
        while stack:
            r, c = stack.pop()
            for q in ((r + 1) % S, c), ((r - 1) % S, c), (r, (c + 1) % S), (r, (c - 1) % S):
                if q in todo:
                    todo.remove(q)
                    stack.append(q)
    return n


def track(video, w):
    """No learned model: per frame, background = median colour; sprite mask = pixels far from it;
    sprite colour = the mean of its core (the pixels farthest from the background) snapped to the
    palette; position = circular (torus) mean of the mask. video (T,3,S,S) -> numpy arrays over T."""
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

def pulled(a, b, c):
    """`pull`'s rule: colour a (or colours (n,3)) came PULL closer to colour c than the reference b."""
    return np.linalg.norm(a - c, axis=-1) <= np.linalg.norm(b - c) - PULL


def turned(d, old, new, speed):
    """Did the sprite turn? d (n,2): its displacements over the first chunk after a switch; their
    mean must be closer to the new event's velocity than to the old one's (to `stay`: slower than
    half the speed). Not the exact speed: "never turns" is not "turns slowly"."""
    if len(d) == 0:
        return False
    mean = d.mean(0)
    if EVENTS[new] == "stay":
        return bool(np.linalg.norm(mean) < speed / 2)
    v_new, v_old = DIRS[new].numpy() * speed, DIRS[old].numpy() * speed
    return bool(np.linalg.norm(mean - v_new) < np.linalg.norm(mean - v_old))


def segments(valid, sw, T):
    """Per switch of a T-frame video: the valid frames of the segment before it and of the one it
    starts -> [(before, after)]."""
    b = [0] + [f for f, _, _ in sw] + [T]
    return [([t for t in range(b[i], b[i + 1]) if valid[t]], [t for t in range(b[i + 1], b[i + 2]) if valid[t]])
            for i in range(len(sw))]


def look(tr, frames):
    """A segment's appearance: its most frequent (sprite colour id, background id) over frames."""
    return np.bincount(tr["color_id"][frames]).argmax(), np.bincount(tr["bg_id"][frames]).argmax()


def video_metrics(video, ev, w, first=1, grace=2, tol=0.5, chunk=2):
    """Exact world metrics (floats; nan where one does not apply) of one video (T,3,S,S) generated
    under per-frame events ev (T,). Transitions into frames before `first` are not scored; `react`
    looks at the first `chunk` frames after each switch; `latency` averages over the `n_react` switches that reacted."""
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
    lat, ident, free, bias, pull, react = [], [], [], [], [], []
    for i, ((f, old, new), (before, after)) in enumerate(zip(sw, segments(tr["valid"], sw, T))):
        end = bounds[i + 2]
        first_chunk = [t - 1 for t in range(f, min(f + chunk, end)) if pair[t - 1]]   # transitions into f..f+chunk-1
        react.append(float(turned(d[first_chunk], old, new, w.speed)))
        hits = [t for t in range(f, end - 1) if match[t - 1] and match[t]]
        if react[-1]:
            lat.append(hits[0] - f if hits else end - f)
        if not before or not after:
            ident.append(0.0)
            free.append(0.0)
            continue
        ref = look(tr, before)
        ident.append(float(all((tr["color_id"][t], tr["bg_id"][t]) == ref for t in after)))
        free.append(float(all((np.linalg.norm(tr[k][after] - tr[k][before].mean(0), axis=1) <= FREE).all()
                              for k in ("color", "bg"))))                 # continuous colours: no palette snap
        if CANON[new] >= 0 and ref[0] != CANON[new]:              # could the teacher's bias show here?
            bias.append(float(np.bincount(tr["color_id"][after]).argmax() == CANON[new]))
        c, b, a = (w.colors[CANON[new]].numpy(), tr["color"][before].mean(0), tr["color"][after].mean(0))
        if CANON[new] >= 0 and np.linalg.norm(b - c) >= PULL:      # the same, on mean colours: no palette snap
            pull.append(float(pulled(a, b, c)))
    seg0 = [t for t in range(bounds[1]) if tr["valid"][t]]
    tail = [t for t in range(T - max(2, T // 8), T) if tr["valid"][t]]
    if seg0 and tail:   # two colour distances over twice the colour cube's diagonal, in [0, 1]
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
        identity_free=float(np.mean(free)) if free else float("nan"),
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


def mean_over_videos(per_video):
    """Mean of each metric over videos, ignoring nan (metrics that did not apply)."""
    return {k: float(np.nanmean(v)) if not np.all(np.isnan(v)) else float("nan") for k, v in per_video.items()}


def clip_scores(x, one, sw, w, first, chunk):
    """Scores of the evaluation clips x = [one-event ; switch] (2n,T,...): follow, valid, jumps,
    canon on the one-event clips; react, latency, identity, identity_free, bias, pull (and their valid) on the switches."""
    n = len(one)
    m1 = mean_over_videos(batch_metrics(x[:n], one, w, first=first, chunk=chunk))
    m2 = mean_over_videos(batch_metrics(x[n:], sw, w, first=first, chunk=chunk))
    out = {k: m1[k] for k in ("follow", "valid", "jumps", "canon")}
    out.update({k: m2[k] for k in ("react", "latency", "identity", "identity_free", "bias", "pull")}, switch_valid=m2["valid"])
    return out
