"""The streaming rollout: the rolling KV cache with its sink (Self Forcing sec. 3.4; StreamingLLM,
LongLive), one streaming forward, LongLive's KV-recache at a switch, and the causal few-step rollout
(Self Forcing sec. 3.2, Alg. 1) that training and sampling both call. The model is model.py's.
"""
import torch

from model import add_noise, pred_x0


class KVCache:
    """Keys and values of clean past frames: the first n_sink frames (the sink) plus a rolling window
    of the last n_window, so memory and cost per frame stay constant forever (Self Forcing sec. 3.4;
    the sink as in StreamingLLM and LongLive). A ring of buffers written in place: a streaming forward
    sees all of them (empty slots masked), so a compiled step keeps its shapes. Positions are assigned
    by slot (sink first, then the window by age), so RoPE distances stay in the range seen in training."""

    def __init__(self, n_sink, n_window):
        self.n_sink, self.n_window = n_sink, n_window
        self.kv = None                                               # (depth,2,B,H,cap,N,hd), cap = n_sink + n_window
        self.frames = self.events = self.pos = self.valid = None     # (B,cap,C,H,W), (B,cap), (cap,) positions, filled
        self.born = self.cleared = None                              # (cap,) frame held by each slot, (B,) clear time
        self.n_seen = 0                                              # frames written since the start

    def __len__(self):
        return min(self.n_seen, self.n_sink + self.n_window)

    def newest_events(self):
        """(B,) the event of the newest cached frame (the sink keeps its slots, the window wraps)."""
        t = self.n_seen - 1
        return self.events[:, t if t < self.n_sink else self.n_sink + (t - self.n_sink) % self.n_window]

    def view(self, T):
        """VideoDiT.forward's `past` for T frames: the whole buffers, their positions, the T new frames'
        positions, and which slots each stream may see: (cap,) while filling, (B,cap) once a stream was cleared, None when all see all."""
        if self.n_seen == 0:
            return None
        n = len(self)
        return self.kv, self.pos, torch.arange(n, n + T, device=self.kv.device), self.valid

    def write(self, frames, events, kv):
        """Store T new frames (B,T,C,H,W), events (B,T) and keys/values kv (depth,2,B,H,T,N,hd), in place."""
        T, cap, dev = frames.shape[1], self.n_sink + self.n_window, frames.device
        if T > self.n_window:
            raise ValueError(f"cannot write {T} frames at once into a window of {self.n_window}")
        if self.kv is None:
            self.kv = kv.new_zeros(*kv.shape[:4], cap, *kv.shape[5:])
            self.frames, self.events = frames.new_zeros(frames.shape[0], cap, *frames.shape[2:]), events.new_zeros(events.shape[0], cap)
            self.born = torch.full((cap,), -1, device=dev)
        t = torch.arange(self.n_seen, self.n_seen + T, device=dev)
        slot = torch.where(t < self.n_sink, t, self.n_sink + (t - self.n_sink) % self.n_window)
        # Detached: history is context, never a gradient path (Self Forcing's official code leaks here).
        self.kv.index_copy_(4, slot, kv.detach().to(self.kv.dtype))   # Self Forcing sec. 3.4: rolling KV cache
        self.frames.index_copy_(1, slot, frames.detach().to(self.frames.dtype))
        self.events.index_copy_(1, slot, events.detach())
        self.born.index_copy_(0, slot, t)
        self.n_seen += T
        s = torch.arange(cap, device=dev)                            # filling: slot s holds frame s, position s
        head = (self.n_seen - self.n_sink) % self.n_window           # full: the window slot of the oldest frame
        self.pos = s if self.n_seen <= cap else torch.where(s < self.n_sink, s, self.n_sink + (s - self.n_sink - head) % self.n_window)
        self._update_valid()

    def clear(self, mask):
        """Hide every frame written so far from the streams in mask (B,) bool; the others keep theirs."""
        if self.n_seen and mask.any():
            now = torch.full_like(mask, self.n_seen, dtype=torch.long)
            self.cleared = torch.where(mask, now, 0 if self.cleared is None else self.cleared)
            self._update_valid()

    def _update_valid(self):
        cap, filled = self.n_sink + self.n_window, self.born >= 0   # filled: (cap,)
        if self.cleared is not None:                                 # (B,cap): slots written after each stream's clear
            self.valid = filled[None] & (self.born[None] >= self.cleared[:, None])
        else:
            self.valid = filled if self.n_seen < cap else None       # None once all are filled: no mask at all

    def ordered(self):
        """(frames, events) of the filled slots in stream order (sink, then window by age)."""
        order = torch.argsort(self.pos[:len(self)])
        return self.frames[:, order], self.events[:, order]


def randn(shape, gen, device):
    """Gaussian noise from gen: None (the global RNG: training), one torch.Generator, or one per video, so
    that a video's noise never depends on the others in its batch (drawn on the CPU, reproducible)."""
    if gen is None:
        return torch.randn(shape, device=device)
    if isinstance(gen, torch.Generator):
        return torch.randn(shape, generator=gen).to(device, non_blocking=True)
    return torch.stack([torch.randn(shape[1:], generator=g) for g in gen]).to(device, non_blocking=True)   # (B, ...)


def stream(model, x, sigma, event, cache, write=False):
    """One streaming forward: x attends to [cache ; itself]; write=True then stores its keys/values
    in the cache (detached). The model call itself is pure, so it can be compiled."""
    past = cache.view(x.shape[1])
    # standard strides: x and event are often slices, and a compiled step guards on strides
    x, sigma, event = (a.clone(memory_format=torch.contiguous_format) for a in (x, sigma, event))
    if not write:
        return model(x, sigma, event, past=past)
    v, kv = model(x, sigma, event, past=past, return_kv=True)
    cache.write(x, event if event.dim() == 2 else event[:, None].expand(x.shape[:2]), kv)
    return v


@torch.no_grad()
def recache(model, cache, event, chunk, relabel_sink=True):
    """LongLive's KV-recache: at a switch, the cached frames' keys and values recomputed under the new
    event (B,) chunk by chunk as written; relabel_sink=False keeps the sink's (LongLive's inference).
    Streams already under the event are untouched."""
    n = len(cache)
    if n == 0:
        return
    frames, old = cache.ordered()                                # (B,n,C,H,W), (B,n) in stream order
    new = torch.where(torch.arange(n, device=old.device) < (0 if relabel_sink else cache.n_sink), old, event[:, None])
    changed = (old != new).any(1)                                # (B,)
    fresh = KVCache(cache.n_sink, cache.n_window)
    kept = 0 if relabel_sink or cache.n_sink % chunk else min(n, cache.n_sink)
    for i in range(0, n, chunk):                                 # LongLive, KV-recache: old frames, new prompt
        f = frames[:, i:i + chunk]                               # (B,chunk,C,H,W); a kept sink is copied, not re-run
        if i < kept:
            fresh.write(f, old[:, i:i + chunk], cache.kv[:, :, :, :, i:i + chunk])
        else:
            stream(model, f, torch.zeros(f.shape[:2], device=f.device), new[:, i:i + chunk], fresh, write=True)
    pos, c = cache.pos[:n], changed.view(1, 1, -1, 1, 1, 1, 1)   # our slot s is fresh's slot pos[s]; c: over kv's dims
    cache.kv[:, :, :, :, :n] = torch.where(c, fresh.kv[:, :, :, :, pos], cache.kv[:, :, :, :, :n])
    cache.events[:, :n] = new[:, pos]


def rollout(model, noise, event, sigmas, chunk, cache, *, exit_step=None, switch="recache_window", gen=None):
    """The causal few-step generator, chunk by chunk through the KV cache (Self Forcing sec. 3.2, Alg. 1);
    training and inference both call it. noise (B,T,C,H,W), event (B,T), sigmas: host floats. Each chunk:
    x0 at sigmas[0], re-noised with fresh noise to sigmas[1], ... up to `exit_step` (default: the last; the
    only step with a graph), whose x0 is the output, then re-run at sigma=0 to write clean keys/values. At a
    stream's switch its cache is recomputed under the new event but the sink ("recache_window", LongLive's
    inference), sink too ("recache"), "keep" or "clear". gen: the re-noising draws (see randn)."""
    B, T = noise.shape[:2]
    exit_step = len(sigmas) - 1 if exit_step is None else exit_step
    before = torch.cat([cache.newest_events()[:, None] if len(cache) else event[:, :1], event[:, :-1]], 1)
    switch_at = (event != before)[:, ::chunk].any(0).tolist()    # per chunk: does some stream switch? (one host read)
    outs = []
    for i in range(0, T, chunk):
        x, ev = noise[:, i:i + chunk], event[:, i:i + chunk]     # (B,chunk,C,H,W), (B,chunk)
        if switch_at[i // chunk] and switch != "keep":            # none of recache's work unless a stream switched
            if switch.startswith("recache"):                    # (the changed streams only)
                recache(model, cache, ev[:, 0], chunk, relabel_sink=switch == "recache")
            else:
                cache.clear(cache.newest_events() != ev[:, 0])
        for k in range(exit_step + 1):                           # Self Forcing sec. 3.2: few-step denoising
            sig = torch.full(ev.shape, sigmas[k], device=x.device)
            with torch.set_grad_enabled(torch.is_grad_enabled() and k == exit_step):   # graph at the exit step only
                x0 = pred_x0(x, stream(model, x, sig, ev, cache), sig)
            if k < exit_step:                                    # re-noise with fresh noise, not an Euler step
                x = add_noise(x0, randn(x0.shape, gen, x0.device), torch.full_like(sig, sigmas[k + 1]))
        outs.append(x0)
        with torch.no_grad():                                    # the cache write carries no gradient
            stream(model, x0, torch.zeros_like(sig), ev, cache, write=True)   # Self Forcing sec. 3.2: clean KV
    return torch.cat(outs, 1)
