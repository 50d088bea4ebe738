"""Delta Forcing: the latent-delta trust region (DESIGN section 8; Wu et al., arXiv 2605.14382).

The paper's equations are not public; this is our reading of its abstract, every term switchable.
For one supervised window y = [c_1..c_K ; z_1..z_F] (committed history, detached; new frames,
with graph) and the DMD level sigma, with T = the teacher's x0 prediction and G = the critic's
(the generator's own distribution) over the window, norms per frame, sg = stop-gradient:

  (1) natural step       m = max(floor, median_j ||c_j - c_{j-1}||)               natural_step
  (2) latent deltas      dT_f = ||T_f - y_{f-1}||,  dG_f = ||G_f - y_{f-1}||        latent_deltas
  (3) consistency        e_f = relu(dT_f - dG_f) / m                               transition_excess
  (4) trust region       R = tau m,  w_f = min(1, tau / (e_f + eps))                trust_weights
  (5) continuity         L_MC,f = relu(||z_f - y_{f-1}|| - R')^2 / R'^2,  R' = r m   monotonic_continuity
  (6) loss               L = mean_f[sg(w_f) L_DMD,f] + lambda mean_f[(1 - sg(w_f)) L_MC,f]   delta_forcing_loss

With w = 1 everywhere and continuity off, (6) is exactly the baseline's masked DMD mean.

Two changes from DESIGN, both forced by one fact: in pixel space the distance between two
frames saturates once the sprite no longer overlaps itself, so a teleport of any size costs
exactly two natural steps.
- The continuity radius is its own, R' = r m (r = mc_radius = 1), not R = tau m: a teleport's
  excess is only 1, so tau must sit below 1 to distrust it, while the continuity bound must
  still admit natural motion of one natural step per frame.
- (5) bounds every step, not the cumulative distance ||z_f - c_K|| <= f R: that bound reaches
  the saturated jump distance at f = 2 and would miss any later jump. Bounding each step implies
  the cumulative bound (triangle inequality), so the allowed deviation still grows monotonically.
"""
import torch


def frame_norm(x):
    """Per-frame L2 norm: (B,T,C,H,W) -> (B,T)."""
    return x.float().flatten(2).norm(dim=-1)


def natural_step(context, floor):
    """Eq. (1): the trajectory's own speed, median frame-to-frame distance of the history. (B,K,...) -> (B,)."""
    if context.shape[1] < 2:
        return torch.full(context.shape[:1], floor, device=context.device)
    return frame_norm(context[:, 1:] - context[:, :-1]).median(1).values.clamp(min=floor)


def latent_deltas(window, teacher_x0, critic_x0, K):
    """Eq. (2): the step the teacher asks for from where the video actually was (dT), and the
    step the generator's own distribution takes at the same noise (dG), for each new frame. (B,F) each."""
    prev = window[:, K - 1:-1].detach()                           # y_{f-1} for every new frame f
    return frame_norm(teacher_x0[:, K:] - prev), frame_norm(critic_x0[:, K:] - prev)


def transition_excess(d_teacher, d_generator, m):
    """Eq. (3): how much farther the teacher jumps than the generator would, in natural steps."""
    return torch.relu(d_teacher - d_generator) / m[:, None]


def trust_weights(excess, tau, eps=1e-6):
    """Eq. (4): PPO/TRPO-style clipping of the teacher's pull; 1 inside the trust region. Detached."""
    return torch.clamp(tau / (excess + eps), max=1.0).detach()


def monotonic_continuity(new, last, R):
    """Eq. (5): each new frame may move at most R from the frame before it (the last committed
    frame c_K for the first), so the video never jumps and its distance from the history grows
    at most as f R. new (B,F,...) with graph, last (B,...) detached, R (B,) -> (B,F)."""
    prev = torch.cat([last[:, None], new[:, :-1]], 1)            # y_{f-1} for every new frame
    return torch.relu(frame_norm(new - prev) - R[:, None]) ** 2 / R[:, None] ** 2


def delta_forcing_loss(per_frame, window, aux, K, tau=0.5, lam=1.0, floor=0.5, weights=True, continuity=True,
                       mc_radius=1.0):
    """Eq. (6). per_frame (B,K+F) DMD losses, window (B,K+F,...) with graph on the new frames,
    aux: the DMD predictions ("real" = teacher, "fake" = critic). Returns the loss and log values."""
    dmd_new = per_frame[:, K:]
    if K == 0:                                                   # the first window of a video has no history
        return dmd_new.mean(), {}
    m = natural_step(window[:, :K].detach(), floor)
    d_t, d_g = latent_deltas(window, aux["real"], aux["fake"], K)
    e = transition_excess(d_t, d_g, m)
    w = trust_weights(e, tau) if weights else torch.ones_like(e)
    R = tau * m
    loss = (w * dmd_new).mean()                                  # Eq. Delta Forcing (6), trust-weighted DMD
    if continuity:
        mc = monotonic_continuity(window[:, K:], window[:, K - 1].detach(), mc_radius * m)
        gate = (1 - w) if weights else 1.0                       # the continuity-only ablation applies it everywhere
        loss = loss + lam * (gate * mc).mean()                   # Eq. Delta Forcing (5)-(6), continuity where trust is low
    return loss, dict(w=w.mean().item(), e=e.mean().item(), R=R.mean().item())
