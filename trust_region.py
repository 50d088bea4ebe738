"""Delta Forcing: the latent-delta trust region (Wu et al., arXiv 2605.14382), our third reading.
What each reading measured is in docs/results.md and docs/history.md.

The paper's equations are not public (only its abstract is); this is our reading, every term
switchable. One supervised window y = [c_1..c_K ; z_1..z_F]: committed history (detached), new
frames (with graph). T and G are the teacher's (with CFG) and the critic's x0 predictions at the
DMD level from the same noisy window under the same per-frame events; the DMD step on every
frame is g = (G - T) / N, N DMD's normaliser (Eq. 7-8 of DMD). mu = per-channel spatial mean, HW pixels;
sg = stop-gradient.

  (1) natural step    m: a constant of the data (world.natural_step), stored by the teacher
  (2) latent delta    V_ij = T^e_j - T^0_j on the committed frames j <= K, at fixed levels         band_verdict
                      sigma_i inside the noise band (teacher with the event e, without it: null)
  (3) consistency     s = sqrt(HW) sqrt(mean_ij ||mu(V_ij)||^2) / m,  b = mean_ij mu(V_ij)      transition_consistency
  (4) trust region    w = min(1, tau / (relu(s - f) + eps)), sg; w = 1 when K = 0                  trust_weight
                      f the teacher's floor (--tr_floor, ours, the default: longtune.Floor), or 0
  (5) flagged step    g'_f(p) = g_f(p) - (1 - w) <g_f(p), b^> b^ at every pixel p, b^ = b / ||b||  flagged_step
                      L_DMD,f = 0.5 ||z_f - sg(z_f - g'_f)||^2
  (6) continuity      L_MC,f = relu(||z_f - z_{f-1}|| - r m)^2 / m^2, z_0 = c_K                    monotonic_continuity
  (7) loss            L = mean_f L_DMD,f + lambda (1 - w) mean_f L_MC,f                           delta_forcing_loss
  (6') appearance     L_AC,f = relu(sqrt(HW) ||mu(z_f) - mu(c_K)|| / m - r_a)^2, added to (6) with
                      --tr_appearance (ours, off by default: a toy invariant, below)               appearance_conservation
Flags: tau (4), tr_floor (4), band_levels (2), mc_radius = r (6), ac_radius = r_a (6'), lam = lambda (7);
tr_step, tr_continuity, tr_appearance switch terms; trust_const holds w constant (the control).

Why the committed frames, and why the condition's verdict: those frames already happened. Asked
about them with and without the event, a teacher that follows the trajectory paints them alike;
what the event alone would still change there is the conditional bias, the teacher painting
identity by the condition (the abstract's "condition-aligned but trajectory-agnostic"). It shows
only inside the noise band, where the teacher sees the position but guesses the colour: above it
the teacher is blind with or without the event, below it sees everything. So (2) asks at fixed
levels inside the band (drift.py --probe=band finds them), not at the DMD's random level, whose
size tracks the level and not the window (the second reading's k, AUC 0.5). Per-channel means
are invariant to motion and to blur (a pooled latent is, too), so (3) measures appearance only;
its mean b over levels and frames is the direction in channel space the condition pushes.
Why (5) keeps reactivity by construction: a turn moves the sprite, which changes pixels along
sprite - background, a direction the recolour b^ barely shares; only the component of the DMD
step along b^ is scaled, and only by what the window's bias exceeds tau (the accepted bias w s
never exceeds tau: TRPO's bound on the step, the trust region). w = 1 is the baseline's update
exactly (the verdict's noise draws shift the random stream, so a whole run is not the same run).
The verdict runs under the stage's autocast (bf16 on CUDA and on CPUs with bf16 units): its
rounding is part of the signal's floor, and tau was set with it.
Why a floor (4, --tr_floor, ours): s is never 0 on a trained teacher (its noise draws and its
error), and that floor differs between teachers: a teacher without any colour prior shows the same
s after a switch as before, at a level above a biased teacher's matched windows. With f = 0 a fixed
tau then damps an unbiased teacher as much as a biased one; with f the teacher's own level where
its condition cannot be biased yet (longtune.Floor: windows before the video's first switch), tau
bounds only the excess. It is what passes the rho = 0 control (docs/results.md).
Why (6), monotonic: each new frame may move about one natural step from the one before, in any
direction, so natural motion costs nothing (it never fights a turn), while recolours, teleports
and background changes do; it takes the weight (1 - w) the teacher gave up. In pixel space r must
admit the largest natural step, so one-channel recolours escape (6) and are left to (5).
Why (6') is off: motion conserves each channel's spatial mean exactly on this torus, so (6') holds
pooled colour to c_K; that is an oracle of this world a latent model lacks (kept for the ablation).
"""
import torch

from model import add_noise, pred_x0


def frame_norm(x):
    """Per-frame L2 norm: (B,T,C,H,W) -> (B,T)."""
    return x.float().flatten(2).norm(dim=-1)


@torch.no_grad()
def band_verdict(teacher, window, event, *, K, levels):
    """Eq. (2): V_ij = T^e_j - T^0_j, the teacher's x0 of the committed frames with each frame's
    event minus without it, from the window noised to each fixed level in `levels` (one forward).
    window (B,W,...), event (B,W) -> (B,n,K,C,H,W). No gradient: a verdict, never a target."""
    B, n = window.shape[0], len(levels)
    x = window.detach().repeat(n, 1, 1, 1, 1)                    # (n B, W, ...), level-major
    sigma = torch.tensor(levels, device=x.device).repeat_interleave(B)[:, None].expand(n * B, window.shape[1])
    xt = add_noise(x, torch.randn_like(x), sigma)                # Eq. 2, Delta Forcing: the window at each band level
    null = torch.full_like(event, teacher.null_event).repeat(n, 1)
    v = teacher(xt.repeat(2, 1, 1, 1, 1), sigma.repeat(2, 1), torch.cat([event.repeat(n, 1), null])).float()
    v_e, v_0 = v.chunk(2)
    V = pred_x0(xt, v_e, sigma) - pred_x0(xt, v_0, sigma)        # Eq. 2, Delta Forcing: with the event minus without (n B, W, ...)
    return V[:, :K].reshape(n, B, K, *window.shape[2:]).transpose(0, 1)   # (B,n,K,C,H,W)


def transition_consistency(verdict, m):
    """Eq. (3): s = sqrt(HW) sqrt(mean_ij ||mu(V_ij)||^2) / m, the appearance the event alone would
    still change in frames that happened, in natural steps; b = mean_ij mu(V_ij), its direction.
    verdict (B,n,K,C,H,W) -> s (B,), b (B,C)."""
    mu = verdict.float().mean((-2, -1))                          # (B,n,K,C) per-channel spatial means
    hw = verdict.shape[-1] * verdict.shape[-2]
    return mu.norm(dim=-1).pow(2).mean((1, 2)).sqrt() * hw ** 0.5 / m, mu.mean((1, 2))


def trust_weight(s, tau, floor=0.0, eps=1e-6):
    """Eq. (4): w = min(1, tau / (relu(s - f) + eps)), after TRPO/PPO: how much of the flagged pull the
    window accepts, so that the accepted bias above the floor, w (s - f), never exceeds tau. f = 0
    is the plain reading; f = inf trusts every window. Detached: a weight, never a path."""
    return torch.clamp(tau / (torch.relu(s - floor) + eps), max=1.0).detach()


def flagged_step(grad, b, w, eps=1e-12):
    """Eq. (5): g'(p) = g(p) - (1 - w) <g(p), b^> b^ at every pixel, the DMD step with its component
    along the bias direction b^ scaled by w. grad (B,T,C,H,W), b (B,C), w (B,) -> (B,T,C,H,W)."""
    bh = (b / (b.norm(dim=-1, keepdim=True) + eps))[:, None, :, None, None]   # (B,1,C,1,1) b^
    along = (grad * bh).sum(2, keepdim=True)                    # Eq. 5, Delta Forcing: <g(p), b^>, (B,T,1,H,W)
    return grad - (1 - w)[:, None, None, None, None] * along * bh   # Eq. 5, Delta Forcing: the flagged component scaled


def dmd_per_frame(x, grad):
    """Eq. (5), L_DMD,f = 0.5 ||x_f - sg(x_f - g_f)||^2 per frame, as distill.dmd_loss writes it.
    x (B,T,...) with graph -> (B,T)."""
    target = (x.detach() - grad).double()
    return 0.5 * ((x.double() - target) ** 2).mean(dim=(2, 3, 4))


def monotonic_continuity(new, last, m, mc_radius):
    """Eq. (6): L_MC,f = relu(||z_f - z_{f-1}|| - r m)^2 / m^2 with z_0 = c_K.
    new (B,F,...) with graph, last (B,...) the last committed frame -> (B,F)."""
    prev = torch.cat([last.detach()[:, None], new[:, :-1]], 1)   # z_{f-1} for every new frame
    return torch.relu(frame_norm(new - prev) - mc_radius * m) ** 2 / m ** 2


def appearance_conservation(new, last, m, ac_radius):
    """Eq. (6'): L_AC,f = relu(sqrt(HW) ||mu(z_f) - mu(c_K)|| / m - r_a)^2, mu the per-channel
    spatial mean (motion leaves it unchanged). new (B,F,C,H,W) with graph, last (B,C,H,W) -> (B,F)."""
    scale = (new.shape[-1] * new.shape[-2]) ** 0.5                # a whole-frame change of d per pixel scores d sqrt(HW), as ||.|| does
    dev = (new.float().mean((3, 4)) - last.detach().float().mean((2, 3))[:, None]).norm(dim=-1) * scale / m
    return torch.relu(dev - ac_radius) ** 2


def delta_forcing_loss(window, grad, verdict, *, K, m, tau, lam, mc_radius, ac_radius, tr_step, tr_continuity,
                       tr_appearance, trust_const, floor):
    """Eq. (7): L = mean_f L_DMD,f (the flagged step, Eq. 5) + lambda (1 - w) mean_f L_MC,f over the
    F new frames. window (B,K+F,...) with graph on the new frames; grad: the DMD step g of
    distill.dmd_loss (B,K+F,...); verdict: band_verdict's V (None when K = 0); m: the natural step;
    floor: f of Eq. 4 (a number or a 0-dim tensor).
    Returns the loss and, for the log, each window's w, s and mean L_MC (B,), detached."""
    if K == 0:                                                   # the first window of a video: w = 1, plain DMD
        return dmd_per_frame(window, grad).mean(), {}
    s, b = transition_consistency(verdict, m)                    # Eq. 2-3, Delta Forcing: latent delta, consistency
    w = trust_weight(s, tau, floor) if not trust_const else torch.full_like(s, trust_const)   # Eq. 4, Delta Forcing: trust region
    g = flagged_step(grad, b, w) if tr_step else grad            # Eq. 5, Delta Forcing: only the flagged component scaled
    loss = dmd_per_frame(window[:, K:], g[:, K:]).mean()         # Eq. 5, Delta Forcing: DMD on the new frames
    logs = dict(w=w, s=s.detach())
    if tr_continuity:
        new, last = window[:, K:], window[:, K - 1]
        mc = monotonic_continuity(new, last, m, mc_radius)       # Eq. 6, Delta Forcing: monotonic continuity
        if tr_appearance:
            mc = mc + appearance_conservation(new, last, m, ac_radius)   # Eq. 6', Delta Forcing (ours): appearance
        loss = loss + lam * ((1 - w)[:, None] * mc).mean()       # Eq. 7, Delta Forcing: continuity takes the rest
        logs["mc"] = mc.detach().mean(1)
    return loss, logs
