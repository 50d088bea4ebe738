"""Delta Forcing: the latent-delta trust region (Wu et al., arXiv 2605.14382), our reading plus
one term of ours (5'). What each reading measured is in docs/results.md and docs/history.md.

The paper's equations are not public (only its abstract is); this is our reading, every term
switchable. For one supervised window y = [c_1..c_K ; z_1..z_F] (committed history, detached;
new frames, with graph), at the DMD level sigma, let T and G be the teacher's (with CFG) and the
critic's x0 predictions from the same noisy window under the same per-frame events. The critic
models the generator's own distribution. Norms are per frame; sg = stop-gradient.

  (1) natural step       m: a constant of the data (world.natural_step), stored by the teacher
  (2) latent delta       D_j = T_j - G_j                                            latent_delta
  (3) consistency        k = sqrt(mean_{j<=K} ||D_j||^2) / m, on the committed frames   transition_consistency
  (4) trust region       w = min(1, tau / (k + eps)), sg; w = 1 when K = 0            trust_weight
  (5) continuity         L_MC,f = relu(||z_f - z_{f-1}|| - r m)^2 / m^2, z_0 = c_K     monotonic_continuity
  (6) loss               L = mean_f [w L_DMD,f] + lambda (1 - w) mean_f [L_MC,f]       delta_forcing_loss
  (5') appearance        L_AC,f = relu(sqrt(HW) ||mu(z_f) - mu(c_K)|| / m - r_a)^2     appearance_conservation
                         mu = per-channel spatial mean; added to L_MC with --tr_appearance (ours, below)
Flags: tau (4), mc_radius = r (5), ac_radius = r_a (5'), lam = lambda (6); tr_weights,
tr_continuity, tr_appearance switch terms off. longtune.py's config holds every default.

Why on the committed frames: they already happened. A teacher that follows the trajectory
agrees with the generator there, and both see the same noisy input, so blur cancels in D. What
the teacher would still change in frames that happened, it changes for the condition, not the
trajectory: a recolour toward the new event's canonical colour (the conditional bias) shows up
there first. A genuine reaction to a new event lives in the new frames and leaves k small.
Why (5) is monotonic: each new frame may move about one natural step from the one before, in
any direction, so the deviation from the history grows at most linearly; natural motion costs
nothing (it never fights a turn), while recolours, teleports and background changes do. In
pixel space a step's size depends on the colours involved, so r must admit the largest natural
step, and low-contrast teleports and one-channel recolours escape (5): they are left to (4).
Why (5'): a sprite that loses its identity often dissolves over a few frames, each step smaller
than a natural one, so (5) cannot see it. Motion conserves each channel's spatial mean exactly
(on this torus; in a latent model approximately: pooled latents are translation invariant),
while a recolour, a fade or a background change moves it, so the pooled colour of every new
frame is held to the history's c_K, not stepwise (a slow fade accumulates); r_a leaves room for
blur. It never fights a turn.
One gate: w of (4) scales the DMD term and (1 - w) the continuity term; the ablations switch a
term off, never the gate (--tr_weights=False: DMD at full weight, continuity still gated by 1 - w).
With w = 1 and the continuity term off, (6) is exactly the baseline's masked DMD mean.
"""
import torch


def frame_norm(x):
    """Per-frame L2 norm: (B,T,C,H,W) -> (B,T)."""
    return x.float().flatten(2).norm(dim=-1)


def latent_delta(teacher_x0, critic_x0):
    """Eq. (2): D = T - G, where the teacher's and the generator's trajectories part at the same
    noisy input. (The DMD gradient of Eq. 7 is -D, normalised.)"""
    return teacher_x0 - critic_x0


def transition_consistency(delta, K, m):
    """Eq. (3): k = sqrt(mean_{j<=K} ||D_j||^2) / m, how much the teacher would still change the
    K committed frames, in natural steps. delta (B,K+F,...) -> (B,)."""
    return frame_norm(delta[:, :K]).pow(2).mean(1).sqrt() / m


def trust_weight(k, tau, eps=1e-6):
    """Eq. (4): w = min(1, tau / (k + eps)), after TRPO/PPO: how much of the teacher's pull the
    window accepts. Detached: a weight, never a path for gradient."""
    return torch.clamp(tau / (k + eps), max=1.0).detach()


def monotonic_continuity(new, last, m, mc_radius):
    """Eq. (5): L_MC,f = relu(||z_f - z_{f-1}|| - r m)^2 / m^2 with z_0 = c_K.
    new (B,F,...) with graph, last (B,...) the last committed frame -> (B,F)."""
    prev = torch.cat([last.detach()[:, None], new[:, :-1]], 1)   # z_{f-1} for every new frame
    return torch.relu(frame_norm(new - prev) - mc_radius * m) ** 2 / m ** 2


def appearance_conservation(new, last, m, ac_radius):
    """Eq. (5'): L_AC,f = relu(sqrt(HW) ||mu(z_f) - mu(c_K)|| / m - r_a)^2, mu the per-channel
    spatial mean (motion leaves it unchanged). new (B,F,C,H,W) with graph, last (B,C,H,W) -> (B,F)."""
    scale = (new.shape[-1] * new.shape[-2]) ** 0.5                # a whole-frame change of d per pixel scores d sqrt(HW), as ||.|| does
    dev = (new.float().mean((3, 4)) - last.detach().float().mean((2, 3))[:, None]).norm(dim=-1) * scale / m
    return torch.relu(dev - ac_radius) ** 2


def delta_forcing_loss(per_frame, window, aux, *, K, m, tau, lam, mc_radius, ac_radius, tr_weights, tr_continuity,
                       tr_appearance):
    """Eq. (6): L = mean_f [w L_DMD,f] + lambda (1 - w) mean_f [L_MC,f] over the F new frames.
    per_frame (B,K+F) DMD losses; window (B,K+F,...) with graph on the new frames; aux: the DMD
    predictions ("real" = T, "fake" = G); m: the natural step (a float).
    Returns the loss and, for the log, each window's w, k and mean L_MC (B,), detached."""
    dmd_new = per_frame[:, K:]
    if K == 0:                                                   # the first window of a video: w = 1
        return dmd_new.mean(), {}
    k = transition_consistency(latent_delta(aux["real"], aux["fake"]), K, m)   # Eq. 2-3, Delta Forcing: latent delta, consistency
    w = trust_weight(k, tau)                                     # Eq. 4, Delta Forcing: the one gate of both terms
    w_dmd = w if tr_weights else torch.ones_like(w)              # --tr_weights=False: DMD at full weight, gate unchanged
    loss = (w_dmd[:, None] * dmd_new).mean()                     # Eq. 6, Delta Forcing: trust-weighted DMD
    logs = dict(w=w, k=k.detach())
    if tr_continuity:
        new, last = window[:, K:], window[:, K - 1]
        mc = monotonic_continuity(new, last, m, mc_radius)       # Eq. 5, Delta Forcing: monotonic continuity
        if tr_appearance:
            mc = mc + appearance_conservation(new, last, m, ac_radius)   # Eq. 5', Delta Forcing (ours): appearance
        loss = loss + lam * ((1 - w)[:, None] * mc).mean()       # Eq. 6, Delta Forcing: continuity term, gated by 1 - w
        logs["mc"] = mc.detach().mean(1)
    return loss, logs
