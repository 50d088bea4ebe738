"""Delta Forcing's trust region (DESIGN section 8) on exact world frames."""
import torch

import longtune
import trust_region as tr
from model import load_checkpoint
from test_distill import teacher_dir  # noqa: F401  (module fixture)
from test_longtune import student_dir  # noqa: F401
from world import BACKGROUNDS, SPRITE_COLORS, World, render, trajectory

W = World()


def clip(pos0, moves, color=0, bg=0):
    """Frames of one sprite: moves is a list of event ids, one per frame after the first. -> (T,3,S,S)."""
    ev = torch.tensor([[0] + moves])
    pos = trajectory(torch.tensor([pos0]), ev, 1, 16)
    return render(pos, SPRITE_COLORS[[color]], BACKGROUNDS[[bg]], 16, 4)[0]


def window_and_preds(teacher_next):
    """History of 3 frames moving right, then 1 new frame; the critic continues right, the teacher
    proposes `teacher_next` for the new frame."""
    hist = clip((5, 5), [0, 0, 0])                               # 4 frames moving right
    window = hist[None]                                          # (1,4,3,S,S): K=3 context + 1 new
    fake = window.clone()
    real = window.clone()
    real[0, 3] = teacher_next
    return window, real, fake


def weights_for(teacher_next, tau=0.5):
    window, real, fake = window_and_preds(teacher_next)
    m = tr.natural_step(window[:, :3], 0.5)
    d_t, d_g = tr.latent_deltas(window, real, fake, 3)
    return tr.trust_weights(tr.transition_excess(d_t, d_g, m), tau), m


def test_direction_change_is_trusted_and_jumps_are_not():
    turn = clip((5, 5), [0, 0, 3])[3]                            # up instead of right, at the natural speed
    w_turn, m = weights_for(turn)
    assert w_turn.item() > 0.95
    recolour = clip((5, 5), [0, 0, 0], color=2)[3]               # the same step, but the sprite turns blue
    teleport = clip((12, 1), [0, 0, 0])[3]                       # the sprite reappears elsewhere
    background = clip((5, 5), [0, 0, 0], bg=1)[3]
    for jump in (recolour, teleport, background):
        assert weights_for(jump)[0].item() <= 0.5 + 1e-4         # a teleport's excess saturates at 1 step
    assert m.item() > 0.5                                        # the natural step is the sprite's own speed


def test_continuity_zero_for_bounded_speed_positive_for_jump():
    hist = clip((5, 5), [0, 0, 0, 0, 0])                          # the history's last frame, then 2 new frames
    R = tr.frame_norm(hist[None, 1:2] - hist[None, 0:1])[:, 0]     # one natural step, mc_radius = 1
    smooth = tr.monotonic_continuity(hist[None, 3:5], hist[None, 2], R)
    turned = tr.monotonic_continuity(clip((5, 5), [0, 0, 3, 3, 3])[None, 3:5], hist[None, 2], R)
    late_jump = torch.stack([hist[3], clip((13, 12), [0])[0]])  # natural first step, then a teleport
    jump = tr.monotonic_continuity(late_jump[None], hist[None, 2], R)
    assert smooth.abs().max() < 1e-6 and turned.abs().max() < 1e-6
    assert jump[0, 0] < 1e-6 and jump[0, 1] > 0.1                # caught where it happens, however late


def test_weights_one_and_no_continuity_equal_the_baseline_exactly():
    torch.manual_seed(0)
    base = torch.randn(2, 8, 3, 16, 16)
    aux = dict(real=torch.randn(2, 8, 3, 16, 16), fake=torch.randn(2, 8, 3, 16, 16))
    mask = torch.arange(8) >= 2
    grads = []
    for trust in (False, True):
        x = base.clone().requires_grad_()
        per_frame = ((x - 1.0) ** 2).mean(dim=(2, 3, 4)).double()
        cfg = longtune.LongtuneConfig(trust_region=trust, tau=1e12, tr_continuity=False)
        loss, logs = longtune.window_loss(per_frame, x, mask, aux, cfg)
        loss.backward()
        grads.append((loss.detach(), x.grad))
        if trust:
            assert logs["w"] == 1.0
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_weights_are_detached():
    real = torch.randn(1, 4, 3, 16, 16, requires_grad=True)
    window, fake = torch.randn(1, 4, 3, 16, 16, requires_grad=True), torch.randn(1, 4, 3, 16, 16)
    d_t, d_g = tr.latent_deltas(window, real, fake, 2)
    w = tr.trust_weights(tr.transition_excess(d_t, d_g, torch.ones(1)), 0.1)
    assert not w.requires_grad and (w < 1).any()
    per_frame = torch.rand(1, 4, requires_grad=True)
    loss, _ = tr.delta_forcing_loss(per_frame, window, dict(real=real, fake=fake), 2, tau=0.1)
    loss.backward()
    assert real.grad is None                                     # nothing flows into the proposals through w


def test_longtune_trust_region_end_to_end(student_dir):  # noqa: F811
    cfg = longtune.LongtuneConfig(out_dir=str(student_dir), max_steps=3, batch=2, critic_ratio=1, windows=2,
                                  log_every=1, trust_region=True)
    longtune.main(cfg)
    assert load_checkpoint(str(student_dir / "deltaforcing.pt"), ["longtune"], "")["step"] == 3
