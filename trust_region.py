"""Delta Forcing: the latent-delta trust region (Wu et al., arXiv 2605.14382), our reading.

The paper's equations are not public (only its abstract is); the numbers DF (1)-(7) are ours, and
every term can be switched off. One supervised window y = [c_1..c_K ; z_1..z_F]: committed history
(detached), new frames (with graph). The DMD step on every frame is g = (G - T) / N (DMD Eq. 7-8,
distill.dmd_loss): T the teacher's x0 with CFG, G the critic's, N DMD's normaliser. T^e and T^0 are
the teacher's x0 with each frame's event and with the null event; mu is the per-channel spatial mean
over the HW pixels; sg is stop-gradient.

  DF (1) natural step   m: a constant of the data (world.natural_step), stored by the teacher
  DF (2) latent delta   V_ij = T^e_j - T^0_j on the committed frames j <= K,                 band_verdict
                        at fixed levels sigma_i inside the noise band (--tr_verdict=window: on every
                        frame of the window, the new ones too)
  DF (3) consistency    s = sqrt(HW) sqrt(mean_ij ||mu(V_ij)||^2) / m,  b = mean_ij mu(V_ij)  transition_consistency
  DF (4) trust region   w = min(1, tau / (relu(s - s0) + eps)), sg; w = 1 when K = 0         trust_weight, Floor
                        s0: the verdict's floor (--tr_floor), else 0
  DF (5) flagged step   g'(p) = g(p) - (1 - w) <g(p), b^> b^ at every pixel, b^ = b / ||b||  flagged_step
  DF (5') restoring     g'(p) = g(p) + (1 - w) <g0(p) - g(p), b^> b^, g0 the step of the        restoring_step
                        teacher without the event (--tr_restore, the default)
  DF (6) continuity     L_MC,f = relu(||z_f - z_{f-1}|| - r m)^2 / m^2, z_0 = c_K            monotonic_continuity
  DF (6') appearance    L_AC,f = relu(sqrt(HW) ||mu(z_f) - mu(c_K)|| / m - r_a)^2, joins (6)  appearance_conservation
  DF (6'') anchored     (6') with c_K replaced by a, the look before the video's latest switch  (--tr_anchor)
  DF (7) loss           L = mean_f,p 0.5 (z_f - sg(z_f - g'_f))^2 + lambda (1 - w) mean_f L_MC,f  delta_forcing_loss

The abstract's literal words, a row kept to show why (2)-(5) depart from them (--tr_literal): the
teacher's implied transition T_f - c_K against the generator's z_f - c_K on the new frames at DMD's
level, and the trust region as a bound on the whole step (under Adam, which divides by a running RMS,
it weighs windows against each other; it does not bound how far an update moves the weights):
  DF (3L) literal delta  s = sqrt(mean_f ||(T_f - c_K) - (z_f - c_K)||^2) / m = rms_f ||T_f - z_f|| / m   literal_consistency
  DF (5L) proximal step  g' = w g: the whole step, not one direction                         trusted_step

Our replacement for the abstract's "latent delta between teacher and generator trajectories" (2):
the teacher's x0 of frames that already happened, with the event minus without it. A teacher that
follows the trajectory paints them alike; what the event alone would still change there is the
conditional bias, the teacher painting identity by the condition ("condition-aligned but
trajectory-agnostic"). It shows only inside the noise band, where the teacher sees the position but
guesses the colour: above it the teacher is blind with or without the event, below it sees
everything; so (2) asks at fixed levels inside the band (`python -m tools.drift --probe=band` finds
them), not at DMD's random level. Per-channel means are invariant to motion and to blur, so (3)
measures appearance only, and b is the direction in channel space the condition pushes.
Why (4) has a floor: s is never 0 on a trained teacher (its noise draws, its error, bf16 rounding),
and a teacher without any colour prior shows the same s everywhere. s0 is the verdict's own level
where its condition cannot be biased yet (windows before their video's first switch), so tau bounds
only the excess: the accepted bias above the floor, w (s - s0), never exceeds tau (TRPO's bound).
Why (5) and (5') keep reactivity: a turn moves the sprite, which changes pixels along sprite - background,
a direction the recolour b^ barely shares; only the step's component along b^ is changed.
Why (5') redirects where (5) damps: with w > 0 the flagged step still pushes along b^ toward the
event's colour, only slower. Along b^ the restoring step follows instead the teacher asked without
the event, which must take the colour from the history in the window: its component along b^ is
w <g, b^> + (1 - w) <g0, b^>. A teacher without a colour prior gives g0 close to g along b^.
Why (6) is monotonic: each new frame may move about one natural step in any direction, so natural
motion costs nothing while teleports and background changes do; it takes the weight 1 - w the
teacher gave up. In pixel space r must admit nearly every natural step (the band palette's largest,
yellow on grey at 1.47 m, pays a little), so in the default (band) world on blurred predictions (6)
sees background changes only: a recolour (smaller than a step) and a blurred teleport pass under
r m (tests/test_trust_region.py).
(6') sees recolours, but by an invariant of this world (motion conserves each channel's spatial mean on
the torus) that a latent model lacks: off by default, kept for the ablation. (6'') uses the same
invariant against an anchor that does not drift with the generator: c_K does, so (6') bounds one
window's change, (6'') the change accumulated since the video's latest switch (the look before it; a
look already drifted at an earlier switch is kept as it is). Gated by 1 - w like (6), it acts only
while the window is still flagged. Off by default for the same reason as (6').
"""
from dataclasses import dataclass, field, fields

import torch

from distill import dmd_surrogate
from model import add_noise, cond_uncond, pred_x0


@dataclass
class TrustRegion:
    """Delta Forcing's knobs, each named as its longtune flag (from_config reads them by name),
    and the state of DF (4)'s floor across updates."""
    tau: float                     # DF (4): the trust radius, in natural steps
    tr_floor: bool                 # DF (4): s0 is the verdict's floor (Floor); False: s0 = 0
    band_levels: str               # DF (2): the fixed noise levels inside the band, comma-separated
    mc_radius: float               # DF (6): r
    lam: float                     # DF (7): lambda
    ac_radius: float               # DF (6') and (6''): r_a
    tr_step: bool                  # DF (5) or (5') on; off: the DMD step as it is
    tr_continuity: bool            # DF (6) on
    tr_appearance: bool            # DF (6') joins DF (6)
    tr_restore: bool               # DF (5') in place of DF (5)
    trust_const: float             # control: w held at this value in every window (0: off)
    trust_shuffle: bool            # control: DF (4)'s w permuted over the batch's windows
    trust_schedule: float          # control: w at this value in windows of videos that switched, 1 elsewhere (0: off)
    tr_anchor: bool                # DF (6'') joins DF (6)
    tr_literal: bool               # DF (3L) and (5L) in place of DF (2)-(5')
    tr_verdict: str                # DF (2) reads the committed frames ("committed") or the whole window ("window")
    floor: "Floor" = field(init=False, repr=False)
    perm: torch.Generator = field(init=False, repr=False)

    def __post_init__(self):
        self.floor = Floor() if self.tr_floor else None
        self.perm = torch.Generator().manual_seed(0)             # the shuffle's own draws: the run's RNG untouched

    @classmethod
    def from_config(cls, cfg):
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls) if f.init})

    @property
    def levels(self):
        return [float(v) for v in self.band_levels.split(",")]

    def s0(self):
        """DF (4)'s floor now, from earlier updates only."""
        return self.floor.value() if self.floor is not None else 0.0


@torch.no_grad()
def band_verdict(teacher, window, event, *, frames, levels):
    """DF (2): V_ij = T^e_j - T^0_j, the teacher's x0 of the window's first `frames` frames (the K
    committed ones; all W with --tr_verdict=window) with each frame's event minus without it, from the
    window noised to each fixed level in `levels` (one forward). window (B,W,...), event (B,W) ->
    (B,n,frames,C,H,W). No gradient: a verdict, never a target."""
    B, n = window.shape[0], len(levels)
    x = window.detach().repeat(n, 1, 1, 1, 1)                    # (n B, W, ...), level-major
    sigma = torch.tensor(levels, device=x.device).repeat_interleave(B)[:, None].expand(n * B, window.shape[1])
    xt = add_noise(x, torch.randn_like(x), sigma)                # DF (2): the window at each band level
    v_e, v_0 = (v.float() for v in cond_uncond(teacher, xt, sigma, event.repeat(n, 1)))
    V = pred_x0(xt, v_e, sigma) - pred_x0(xt, v_0, sigma)        # DF (2): with the event minus without (n B, W, ...)
    return V[:, :frames].reshape(n, B, frames, *window.shape[2:]).transpose(0, 1)   # (B,n,frames,C,H,W)


def transition_consistency(verdict, m):
    """DF (3): s = sqrt(HW) sqrt(mean_ij ||mu(V_ij)||^2) / m, the appearance the event alone would
    still change in frames that happened, in natural steps; b = mean_ij mu(V_ij), its direction.
    verdict (B,n,K,C,H,W) -> s (B,), b (B,C)."""
    mu = verdict.float().mean((-2, -1))                          # (B,n,K,C) per-channel spatial means
    hw = verdict.shape[-1] * verdict.shape[-2]
    return mu.norm(dim=-1).pow(2).mean((1, 2)).sqrt() * hw ** 0.5 / m, mu.mean((1, 2))


def literal_consistency(real, new, m):
    """DF (3L): s = rms_f ||(T_f - c_K) - (z_f - c_K)|| / m = rms_f ||T_f - z_f|| / m, the teacher's implied
    transition against the generator's over the F new frames, in natural steps. real: DMD's real x0
    (B,F,...), new: the generator's frames (B,F,...) -> s (B,)."""
    return frame_norm(real - new.detach()).pow(2).mean(1).sqrt() / m


def trust_weight(s, tau, s0=0.0, eps=1e-6):
    """DF (4): w = min(1, tau / (relu(s - s0) + eps)), after TRPO/PPO: how much of the flagged pull the
    window accepts, so that the accepted bias above the floor, w (s - s0), never exceeds tau. s0 = 0
    bounds s itself; s0 = inf trusts every window. Detached: a weight, never a path."""
    return torch.clamp(tau / (torch.relu(s - s0) + eps), max=1.0).detach()


class Floor:
    """DF (4)'s floor s0: the running median of s over the windows, among the last `size` supervised ones,
    whose video has not switched yet. There the condition still agrees with the history the student
    painted under it, so s is the verdict's floor, not bias. inf (every window trusted, w = 1) while
    fewer than `least` such windows were seen. The lower median by a sort, on the device."""

    def __init__(self, size=256, least=16):
        self.size, self.least, self.buf = size, least, None

    def value(self):
        """s0 now, a 0-dim tensor: the lower median of the buffer's counted windows, inf until `least`."""
        if self.buf is None:
            return torch.tensor(float("inf"))
        seen = (~self.buf.isnan()).sum()
        mid = self.buf.sort().values.gather(0, ((seen - 1) // 2).clamp(min=0).view(1))[0]   # NaNs sort last
        return torch.where(seen >= self.least, mid, torch.inf)

    def add(self, s, unswitched):
        """s (B,) of this update's windows; unswitched (B,) bool: which count."""
        if self.buf is None:
            self.buf = torch.full((self.size,), float("nan"), device=s.device)
        self.buf = torch.cat([self.buf, torch.where(unswitched, s.float(), torch.nan)])[-self.size:]


def unit(b, eps=1e-12):
    """b^ = b / ||b||, shaped to broadcast over a window's pixels: (B,C) -> (B,1,C,1,1)."""
    return (b / (b.norm(dim=-1, keepdim=True) + eps))[:, None, :, None, None]


def flagged_step(grad, b, w):
    """DF (5): g'(p) = g(p) - (1 - w) <g(p), b^> b^ at every pixel, the DMD step with its component
    along the bias direction b^ scaled by w. grad (B,T,C,H,W), b (B,C), w (B,) -> (B,T,C,H,W)."""
    bh = unit(b)
    along = (grad * bh).sum(2, keepdim=True)                    # DF (5): <g(p), b^>, (B,T,1,H,W)
    return grad - (1 - w)[:, None, None, None, None] * along * bh   # DF (5): the flagged component scaled


def restoring_step(grad, grad_null, b, w):
    """DF (5'): g'(p) = g(p) + (1 - w) <g0(p) - g(p), b^> b^: along b^ the step moves toward the one
    of the teacher without the event, by 1 - w; across b^ it is g. grad, grad_null (B,T,C,H,W)."""
    bh = unit(b)
    along = ((grad_null - grad) * bh).sum(2, keepdim=True)      # DF (5'): <g0(p) - g(p), b^>
    return grad + (1 - w)[:, None, None, None, None] * along * bh


def frame_norm(x):
    """Per-frame L2 norm: (B,T,C,H,W) -> (B,T)."""
    return x.float().flatten(2).norm(dim=-1)


def monotonic_continuity(new, last, m, mc_radius):
    """DF (6): L_MC,f = relu(||z_f - z_{f-1}|| - r m)^2 / m^2 with z_0 = c_K.
    new (B,F,...) with graph, last (B,...) the last committed frame -> (B,F)."""
    prev = torch.cat([last.detach()[:, None], new[:, :-1]], 1)   # z_{f-1} for every new frame
    return torch.relu(frame_norm(new - prev) - mc_radius * m) ** 2 / m ** 2


def appearance_conservation(new, last, m, ac_radius):
    """DF (6'): L_AC,f = relu(sqrt(HW) ||mu(z_f) - mu(c_K)|| / m - r_a)^2, mu the per-channel
    spatial mean (motion leaves it unchanged). new (B,F,C,H,W) with graph, last (B,C,H,W) -> (B,F)."""
    scale = (new.shape[-1] * new.shape[-2]) ** 0.5                # a whole-frame change of d per pixel scores d sqrt(HW), as ||.|| does
    dev = (new.float().mean((3, 4)) - last.detach().float().mean((2, 3))[:, None]).norm(dim=-1) * scale / m
    return torch.relu(dev - ac_radius) ** 2


def trust(s, tr, s0, unswitched):
    """DF (4)'s w, or a control that differs from it in one thing: w held constant, w shuffled over the
    batch's windows, or w set by the schedule alone (unswitched (B,): the window's video has not switched yet)."""
    if tr.trust_const:
        w = torch.full_like(s, tr.trust_const)
    elif tr.trust_schedule:
        w = torch.where(unswitched, 1.0, tr.trust_schedule).to(s.dtype)
    else:
        w = trust_weight(s, tr.tau, s0)                          # DF (4)
    if tr.trust_shuffle:
        w = w[torch.randperm(len(w), generator=tr.perm).to(w.device)]
    return w


def trusted_step(grad, grad_null, b, w, tr):
    """The step DF (7) descends: DF (5') (the default) or (5), where only the component along b^ moves;
    with DF (3L), DF (5L) g' = w g, the whole step bounded; with tr_step off, g itself."""
    if not tr.tr_step:
        return grad
    if tr.tr_literal:
        return w[:, None, None, None, None] * grad               # DF (5L)
    return restoring_step(grad, grad_null, b, w) if tr.tr_restore else flagged_step(grad, b, w)


def delta_forcing_loss(window, grad, verdict, *, K, m, tr, s0, grad_null=None, unswitched=None, real=None,
                       anchor=None):
    """DF (7): L = mean_f L_DMD,f (with trusted_step's step) + lambda (1 - w) mean_f L_MC,f over
    the F new frames. window (B,K+F,...) with graph on the new frames; grad: the DMD step g of
    distill.dmd_loss (B,K+F,...), grad_null its step without the event (for DF (5')), real its real
    x0 (for DF (3L)); verdict: band_verdict's V (None when K = 0 or with DF (3L)); m: the natural step;
    tr: the knobs (TrustRegion); s0: DF (4)'s floor now; unswitched (B,): which windows' videos have
    not switched yet (the schedule control); anchor (B,C,H,W): the look before each video's latest
    switch (DF (6'')). Returns the loss and, for the log, each window's w, s and mean L_MC (B,), detached."""
    if K == 0:                                                   # the first window of a video: w = 1, plain DMD
        return dmd_surrogate(window, grad).mean(), {}
    if tr.tr_literal:
        s, b = literal_consistency(real[:, K:], window[:, K:], m), None   # DF (3L)
    else:
        s, b = transition_consistency(verdict, m)                # DF (2-3): latent delta, consistency
    w = trust(s, tr, s0, unswitched)                             # DF (4), or a control
    g = trusted_step(grad, grad_null, b, w, tr)                  # DF (5'), (5) or (5L)
    loss = dmd_surrogate(window[:, K:], g[:, K:]).mean()         # DF (7): DMD on the new frames
    logs = dict(w=w, s=s.detach())
    if tr.tr_continuity:
        new, last = window[:, K:], window[:, K - 1]
        mc = monotonic_continuity(new, last, m, tr.mc_radius)    # DF (6)
        if tr.tr_appearance:
            mc = mc + appearance_conservation(new, last, m, tr.ac_radius)   # DF (6')
        if tr.tr_anchor:
            mc = mc + appearance_conservation(new, anchor, m, tr.ac_radius)   # DF (6''): anchored before the switch
        loss = loss + tr.lam * ((1 - w)[:, None] * mc).mean()    # DF (7): continuity takes the rest
        logs["mc"] = mc.detach().mean(1)
    return loss, logs
