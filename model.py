"""The model, and only the model: one compact video transformer (bidirectional teacher, causal few-step
generator, critic), its KV cache, the streaming rollout, the flow-matching helpers; torch and einops only.

A DiT (Peebles & Xie 2023) over patch tokens of all frames, with per-frame AdaLN-Zero
conditioning on (sigma, event) and 3D RoPE. It runs three ways:
  bidirectional      model(x, sigma, event)                          teacher and critic
  block-causal       model(x, sigma, event, causal_chunk=k)          ODE init and tests
  streaming          stream(model, x, sigma, event, cache, write)    generator rollout and sampling
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


# ----------------------------------------------------------------------------- flow matching
# One convention everywhere: x_sigma = (1 - sigma) x0 + sigma eps, sigma in [0, 1] (1 = pure noise),
# and the network predicts the velocity v = eps - x0. sigma has shape (B,T): one level per frame.

def add_noise(x0, eps, sigma):
    """Rectified flow (Liu et al. 2022; Lipman et al. 2023): the straight path from data to noise."""
    s = sigma[..., None, None, None]                                 # (B,T,1,1,1)
    return (1 - s) * x0 + s * eps


def pred_x0(x, v, sigma):
    """x0 = x_sigma - sigma v, the clean frames implied by a velocity prediction."""
    return x - sigma[..., None, None, None] * v


def shift_sigma(sigma, s):
    """Time shift: pushes levels toward noise for s > 1 (SD3; Self Forcing uses s = 5)."""
    return s * sigma / (1 + (s - 1) * sigma)


def cfg_mix(cond, uncond, g):
    """Classifier-free guidance (Ho & Salimans 2022) in the Self Forcing / DMD convention: cond + g (cond - uncond)."""
    return cond + g * (cond - uncond)


def cond_uncond(model, x, sigma, event):
    """The model's velocity with each frame's event and with the null event, in one batch. -> (v_cond, v_uncond)."""
    null = torch.full_like(event, model.null_event)
    return model(x.repeat(2, 1, 1, 1, 1), sigma.repeat(2, 1), torch.cat([event, null])).chunk(2)


def forward_with_cfg(model, x, sigma, event, g):
    """The velocity with classifier-free guidance g (as DiT's forward_with_cfg); g = 0: one plain forward."""
    return cfg_mix(*cond_uncond(model, x, sigma, event), g) if g else model(x, sigma, event)


# ----------------------------------------------------------------------------- the transformer

@dataclass
class ModelConfig:
    size: int = 16       # frame side in pixels
    channels: int = 3
    patch: int = 4       # p: tokens are p x p patches
    dim: int = 128
    depth: int = 4
    heads: int = 4
    n_events: int = 5    # + 1 null event for classifier-free guidance
    gelu: str = "none"   # the MLP's GELU, nn.GELU's `approximate` ("none": exact, faster on the CPU than "tanh")


def attention(q, k, v, mask=None):
    """The one attention function. q (B,H,Lq,hd), k/v (B,H,Lk,hd), mask: boolean, True = attend.
    On CUDA, SDPA (flash where it can), never is_causal=True (with fewer queries than keys it builds
    the wrong mask). On the CPU written out, softmax(q k^T / sqrt(hd)) v: faster there in bf16."""
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    s = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)              # (B,H,Lq,Lk)
    return (s if mask is None else s.masked_fill(~mask, float("-inf"))).softmax(-1) @ v


def rope_angles(t_pos, grid, head_dim, device):
    """3D RoPE angles (Su et al. 2021) for frames at positions t_pos (T,) -> (T*grid*grid, head_dim/2).
    Pairs split time / row / col. On the torus the spatial frequencies are k 2 pi / grid, k cycling
    over 1 .. grid/2 - 1 (a sprite leaving one edge is one step from the other); Nyquist, whose sine
    is 0 at every integer position, is left out. At grid 4 every spatial pair uses k = 1."""
    n_s = (head_dim // 2 - head_dim // 8) // 2                       # pairs for rows, and as many for cols
    n_t = head_dim // 2 - 2 * n_s                                    # the rest (about a quarter) for time
    f_t = 1.0 / (100 ** (torch.arange(n_t, device=device) / n_t))
    f_s = 2 * math.pi / grid * (1 + torch.arange(n_s, device=device) % max(1, (grid - 1) // 2))
    r = torch.arange(grid, device=device, dtype=torch.float32)
    a_t = t_pos.float()[:, None, None, None] * f_t                   # (T,1,1,n_t)
    a_r = r[None, :, None, None] * f_s                               # (1,g,1,n_s)
    a_c = r[None, None, :, None] * f_s                               # (1,1,g,n_s)
    T = t_pos.shape[0]
    ang = torch.cat([a_t.expand(T, grid, grid, -1), a_r.expand(T, grid, grid, -1), a_c.expand(T, grid, grid, -1)], -1)
    return ang.reshape(T * grid * grid, -1)                          # (T*g*g, head_dim/2)


def rotation(ang):
    """RoPE's rotation, made once per forward for every block: in eager on the CPU e^(i ang) (one complex
    multiply per use); on CUDA, and wherever compiled, the angles, rotated pairwise (inductor has no
    complex arithmetic)."""
    eager_cpu = ang.device.type == "cpu" and not torch.compiler.is_compiling()
    return torch.polar(torch.ones_like(ang), ang) if eager_cpu else ang


def apply_rope(x, rot):
    """Rotate channel pairs of x (B,H,L,hd) by rot = rotation(angles (L,hd/2)) in fp32: (x1, x2) ->
    (x1 cos - x2 sin, x1 sin + x2 cos), back in x's dtype (flash wants q, k, v in one dtype)."""
    if not rot.is_complex():
        return rope_pairs(x, rot)
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))   # (B,H,L,hd/2) complex
    return torch.view_as_real(xc * rot).flatten(-2).type_as(x)


def rope_pairs(x, ang):
    x1, x2, cos, sin = x.float()[..., 0::2], x.float()[..., 1::2], ang.cos(), ang.sin()
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2).type_as(x)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """sigma -> sinusoidal features -> MLP, as DiT embeds its timestep."""
    def __init__(self, dim, freq_dim=128):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, sigma):                                        # (B,T) -> (B,T,D)
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=sigma.device) / half)
        a = 1000 * sigma.float()[..., None] * freqs
        return self.mlp(torch.cat([a.cos(), a.sin()], -1))


class Block(nn.Module):
    def __init__(self, dim, heads, gelu):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate=gelu), nn.Linear(4 * dim, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, rot_q, rot_k, mask, past):
        """x (B,T,N,D) tokens, c (B,T,D) per-frame condition, past: cached keys and values
        (2,B,H,n,N,hd) or None. Returns the new tokens and this chunk's unrotated (k, v), each (B,H,T,N,hd)."""
        B, T, N, D = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c)[:, :, None].chunk(6, -1)   # each (B,T,1,D)
        h = modulate(self.norm1(x), sh1, sc1)
        q, k, v = rearrange(self.qkv(h), "b t n (three h d) -> three b h t n d", three=3, h=self.heads)
        k_all, v_all = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))  # (B,H,n+T,N,hd)
        q = apply_rope(q.flatten(2, 3), rot_q)                       # (B,H,T*N,hd)
        k_all = apply_rope(k_all.flatten(2, 3), rot_k)               # (B,H,(Tc+T)*N,hd)
        o = attention(q, k_all, v_all.flatten(2, 3), mask)
        x = torch.addcmul(x, g1, self.proj(rearrange(o, "b h (t n) d -> b t n (h d)", t=T)))   # x + g1 * ...
        x = torch.addcmul(x, g2, self.mlp(modulate(self.norm2(x), sh2, sc2)))
        return x, (k, v)


class VideoDiT(nn.Module):
    def __init__(self, mc: ModelConfig):
        super().__init__()
        self.mc, p, D = mc, mc.patch, mc.dim
        self.grid = mc.size // p
        self.x_embedder = nn.Linear(mc.channels * p * p, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = nn.Embedding(mc.n_events + 1, D)           # last id = null event (CFG)
        self.blocks = nn.ModuleList(Block(D, mc.heads, mc.gelu) for _ in range(mc.depth))
        self.final_norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.final_layer = nn.Linear(D, mc.channels * p * p)
        self.initialize_weights()

    def initialize_weights(self):
        """AdaLN-Zero as DiT: every block starts as the identity, and the output starts at zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        for mod in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_adaLN[-1], self.final_layer]:
            nn.init.zeros_(mod.weight)
            nn.init.zeros_(mod.bias)

    @property
    def null_event(self):
        return self.mc.n_events

    def patchify(self, x):                                           # (B,T,C,H,W) -> (B,T,N,C*p*p)
        return rearrange(x, "b t c (gh p) (gw q) -> b t (gh gw) (c p q)", p=self.mc.patch, q=self.mc.patch)

    def unpatchify(self, x):                                         # (B,T,N,C*p*p) -> (B,T,C,H,W)
        return rearrange(x, "b t (gh gw) (c p q) -> b t c (gh p) (gw q)", gh=self.grid, p=self.mc.patch, q=self.mc.patch)

    def forward(self, x, sigma, event, past=None, causal_chunk=0, return_kv=False):
        """x (B,T,C,H,W), sigma and event (B,T) or (B,) -> velocity (B,T,C,H,W). Streaming: past =
        KVCache.view() (cached keys/values (depth,2,B,H,n,N,hd), their positions, x's positions, which
        slots may be seen), and x attends to [cache ; itself]; return_kv=True also returns x's own
        keys/values (depth,2,B,H,T,N,hd). Tensors in, tensors out: every shape fixed by the cache."""
        B, T = x.shape[:2]
        sigma, event = (a.expand(B, T) if a.dim() == 2 else a[:, None].expand(B, T) for a in (sigma, event))
        h = self.x_embedder(self.patchify(x))                        # (B,T,N,D)
        c = self.t_embedder(sigma) + self.y_embedder(event)          # (B,T,D)
        hd, N = self.mc.dim // self.mc.heads, self.grid ** 2
        kv, mask = None, None
        if past is None:
            rot_q = rot_k = rotation(rope_angles(torch.arange(T, device=x.device), self.grid, hd, x.device))   # (T*N, hd/2)
        else:
            kv, k_pos, q_pos, valid = past
            rot_k = rotation(rope_angles(torch.cat([k_pos, q_pos]), self.grid, hd, x.device))   # cache, then x
            rot_q = rot_k[-T * N:]
            if valid is not None:                                    # a filling or cleared cache hides slots;
                keys = torch.cat([valid, valid.new_ones(*valid.shape[:-1], T)], -1)   # a full one needs no mask
                mask = keys.repeat_interleave(N, -1)                 # (n+T)*N, or (B, (n+T)*N) per stream
                mask = mask[None] if mask.dim() == 1 else mask[:, None, None]   # broadcast over heads, queries
        if causal_chunk and past is None:                            # query chunk sees its own and earlier chunks
            ch = torch.arange(T, device=x.device).repeat_interleave(N) // causal_chunk
            mask = ch[:, None] >= ch[None, :]                        # (T*N, T*N) bool
        new_kv = []
        for i, block in enumerate(self.blocks):
            h, kv_i = block(h, c, rot_q, rot_k, mask, None if kv is None else kv[i])
            new_kv.append(kv_i)
        sh, sc = self.final_adaLN(c)[:, :, None].chunk(2, -1)        # (B,T,1,D) each
        out = self.unpatchify(self.final_layer(modulate(self.final_norm(h), sh, sc)))
        if return_kv:
            return out, torch.stack([torch.stack(kv_i) for kv_i in new_kv])   # (depth,2,B,H,T,N,hd)
        return out


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
        """VideoDiT.forward's `past` for T frames: the whole buffers, their positions, and which slots each
        stream may see: (cap,) while filling, (B,cap) once a stream was cleared, None when all see all."""
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


def build(model_args, state=None, device="cpu"):
    """A VideoDiT from its arguments (a checkpoint's `model_args` dict), with `state` weights if given."""
    m = VideoDiT(ModelConfig(**model_args))
    if state is not None:
        m.load_state_dict(state)
    return m.to(device)

