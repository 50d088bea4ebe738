"""The model, and only the model: one compact video transformer (bidirectional teacher, causal few-step
generator, critic) and the flow-matching helpers; torch and einops only. Its KV cache and the streaming
rollout are in streaming.py.

A DiT (Peebles & Xie 2023) over patch tokens of all frames, with per-frame AdaLN-Zero
conditioning on (sigma, event) and 3D RoPE. It runs three ways:
  bidirectional      model(x, sigma, event)                          teacher and critic
  block-causal       model(x, sigma, event, causal_chunk=k)          ODE init and tests
  streaming          model(x, sigma, event, past=cache.view(T))      streaming.stream, streaming.rollout
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
    """RoPE's rotation for apply_rope, made once per forward for every block. In eager on the CPU the
    complex e^(i ang) (one complex multiply per use); on CUDA, and wherever compiled, the angles
    themselves, whose cos and sin rope_pairs takes in each block (inductor has no complex arithmetic,
    and a compiled graph fuses them)."""
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
    """apply_rope in real arithmetic: x (B,H,L,hd) rotated pairwise by the angles ang (L,hd/2)."""
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


def build(model_args, state=None, device="cpu"):
    """A VideoDiT from its arguments (a checkpoint's `model_args` dict), with `state` weights if given."""
    m = VideoDiT(ModelConfig(**model_args))
    if state is not None:
        m.load_state_dict(state)
    return m.to(device)

