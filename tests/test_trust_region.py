"""Delta Forcing's trust region (trust_region.py) on exact world frames
(speed 2, m = world.natural_step), and with the teacher's and critic's x0 predictions T and G
blurred as a denoiser's prediction at sigma 0.75 would be. The first reading's tests (natural
step measured on the window's own context, trust from steps away from the previous frame) are
gone with it: that reading collapsed on a static history and on turns."""
import pytest
import torch

import longtune
import trust_region as tr
from world import BACKGROUNDS, COLOR_NAMES, EVENTS, World, natural_step, render, trajectory

W = World(palette="saturated")   # speed 2; the palette these knobs were calibrated on (the band world: later)
M = natural_step(W, 8, 2)      # the data's natural step, about 6.79
K = 2                                                            # committed frames of an 8-frame window
RIGHT, LEFT, DOWN, UP, STAY = (EVENTS.index(e) for e in ("right", "left", "down", "up", "stay"))
TAU, R = 0.5, 1.4                                                # longtune's defaults
KNOBS = ("tau", "lam", "mc_radius", "ac_radius", "tr_weights", "tr_continuity", "tr_appearance")
DEFAULTS = {k: getattr(longtune.LongtuneConfig(), k) for k in KNOBS}   # the one source of every default


def dfl(per_frame, window, aux, **kw):
    """delta_forcing_loss with longtune's defaults for every knob not given."""
    return tr.delta_forcing_loss(per_frame, window, aux, **(DEFAULTS | kw))


def clip(pos0, moves, color=0, bg=0):
    """One sprite (red on dark grey by default) at pos0, then one frame per move (an event id):
    -> (1, 1 + len(moves), 3, S, S)."""
    ev = torch.tensor([[STAY] + moves])
    pos = trajectory(torch.tensor([pos0]), ev, W.speed, W.size)
    return render(pos, W.colors[[color]], BACKGROUNDS[[bg]], W.size, W.sprite)


def turn_window(color=0, bg=0):
    """K = 2 committed frames moving right, then 6 new frames moving up (a turn after a switch)."""
    return clip((5, 5), [RIGHT] + [UP] * 6, color, bg)


def blur(x, shrink=0.9):
    """What a denoiser predicts for x at sigma 0.75, roughly: a 3x3 circular box blur, then a
    shrink toward each frame's mean colour."""
    b = sum(torch.roll(x, (i, j), (-2, -1)) for i in (-1, 0, 1) for j in (-1, 0, 1)) / 9
    mean = x.mean((-2, -1), keepdim=True)
    return mean + shrink * (b - mean)


EXACT, BLURRED = (lambda x: x), blur
PREDICTIONS = pytest.mark.parametrize("pred", [EXACT, BLURRED], ids=["exact", "blurred"])


def loss_and_logs(window, real, fake, per_frame=None, **kw):
    per_frame = torch.rand(window.shape[:2], generator=torch.Generator().manual_seed(0)) if per_frame is None else per_frame
    args = dict(K=K, m=M, tau=TAU, lam=1.0, mc_radius=R) | kw
    return (per_frame, *dfl(per_frame, window, dict(real=real, fake=fake), **args))


def test_natural_step_of_the_world():
    assert M == pytest.approx(6.79, abs=0.01)
    x = clip((5, 5), [RIGHT])                                    # red on grey: one step is exactly m
    assert tr.frame_norm(x[:, 1:] - x[:, :1]).item() == pytest.approx(M)


# ----------------------------------------------------------------------------- (a) a turn is trusted

@PREDICTIONS
def test_turn_after_a_switch_keeps_full_trust_and_costs_nothing_on_every_frame(pred):
    window = turn_window()
    straight = clip((5, 5), [RIGHT] * 7)                         # the critic: the generator would go on right
    real, fake = pred(window), pred(straight)                    # the teacher turns up; T == G on the committed frames
    assert torch.equal(real[:, :K], fake[:, :K]) and not torch.equal(real[:, K:], fake[:, K:])
    per_frame, loss, logs = loss_and_logs(window, real, fake)
    assert logs["w"].tolist() == [1.0] and logs["k"].tolist() == [0.0]
    mc = tr.monotonic_continuity(window[:, K:], window[:, K - 1], M, R)
    assert mc.shape == (1, 6) and (mc == 0).all(), mc            # every new frame, not only the first
    assert torch.equal(loss, baseline(per_frame))


@pytest.mark.parametrize("direction", [LEFT, DOWN, UP, STAY, RIGHT])
def test_one_natural_step_in_any_direction_costs_nothing(direction):
    window = clip((3, 9), [RIGHT] + [direction] * 6)
    assert (tr.monotonic_continuity(window[:, K:], window[:, K - 1], M, R) == 0).all()


# ----------------------------------------------------------------------------- (b) a recolour of history is not

@PREDICTIONS
@pytest.mark.parametrize("new_color", [1, 2])                    # red -> green (up's colour), red -> blue (left's)
def test_teacher_recolouring_the_committed_frames_loses_trust(pred, new_color):
    window = turn_window()
    recoloured = turn_window(color=new_color)
    real, fake = pred(window.clone()), pred(window.clone())
    real[:, :K] = pred(recoloured)[:, :K]                        # T repaints what already happened; G does not
    _, _, logs = loss_and_logs(window, real, fake)
    assert logs["k"].item() > TAU and logs["w"].item() < 1


@pytest.mark.parametrize("c0", range(4))
@pytest.mark.parametrize("c1", range(4))
def test_every_recolour_of_the_committed_frames_loses_trust_on_exact_frames(c0, c1):
    if c0 == c1:
        return
    window = turn_window(color=c0)
    real = window.clone()
    real[:, :K] = turn_window(color=c1)[:, :K]
    _, _, logs = loss_and_logs(window, real, window.clone())
    assert logs["w"].item() < 1, (COLOR_NAMES[c0], COLOR_NAMES[c1], logs)


def test_trust_weight_is_detached_and_shrinks_with_the_delta():
    real = torch.randn(1, 4, 3, 16, 16, requires_grad=True)
    window, fake = torch.randn(1, 4, 3, 16, 16, requires_grad=True), torch.randn(1, 4, 3, 16, 16)
    k = tr.transition_consistency(tr.latent_delta(real, fake), 2, 1.0)
    w = tr.trust_weight(k, 0.1)
    assert k.shape == (1,) and not w.requires_grad and (w < 1).all()
    assert tr.trust_weight(torch.tensor([0.5, 2.0, 4.0]), 1.0).tolist() == pytest.approx([1.0, 0.5, 0.25], rel=1e-5)
    per_frame = torch.rand(1, 4, requires_grad=True)
    loss, _ = dfl(per_frame, window, dict(real=real, fake=fake), K=2, m=1.0, tau=0.1)
    loss.backward()
    assert real.grad is None                                     # nothing flows into the proposals through w
    assert window.grad[:, 2:].abs().max() > 0 and window.grad[:, :2].abs().max() == 0   # continuity on new frames only


def test_transition_consistency_looks_only_at_the_committed_frames():
    delta = torch.zeros(2, 5, 3, 4, 4)
    delta[0, :2] = 1.0                                           # stream 0: the teacher changes the committed frames
    delta[1, 2:] = 5.0                                           # stream 1: only the new ones (a reaction)
    k = tr.transition_consistency(delta, 2, 2.0)
    assert k[0].item() == pytest.approx((3 * 16) ** 0.5 / 2) and k[1].item() == 0


# ----------------------------------------------------------------------------- (c) jumps in the new frames cost

def jumped(kind, at):
    """The turn window with new frame `at` (0-based among the 6 new) and the ones after it broken."""
    window = turn_window()
    if kind == "recolour":
        window[:, K + at:] = turn_window(color=2)[:, K + at:]
    elif kind == "teleport":                                     # half the frame away, then moving on from there
        window[:, K + at:] = torch.roll(window[:, K + at:], (8, 8), (-2, -1))
    elif kind == "background":
        window[:, K + at:] = turn_window(bg=2)[:, K + at:]      # purple (on teal, red's own step is over r m)
    return window


@pytest.mark.parametrize("kind", ["recolour", "teleport", "background"])
@pytest.mark.parametrize("at", [0, 3, 5])
def test_recolour_teleport_and_background_change_cost_on_that_frame(kind, at):
    window = jumped(kind, at)
    mc = tr.monotonic_continuity(window[:, K:], window[:, K - 1], M, R)[0]
    # caught where it happens, however late; red on grey, a teleport is 1.414 m, just over r m = 1.4 m
    assert mc[at] > (0 if kind == "teleport" else 0.01), (kind, mc)
    assert (mc[:at] == 0).all() and (mc[at + 1:] == 0).all()     # and nowhere else: the frames after move naturally


@PREDICTIONS
def test_continuity_pulls_on_the_jump_once_trust_is_low(pred):
    window = jumped("teleport", 3).requires_grad_()
    real, fake = pred(window.detach().clone()), pred(window.detach().clone())
    real[:, :K] = pred(turn_window(color=1))[:, :K]              # the teacher also repaints history: w < 1
    per_frame = torch.zeros(1, 8, dtype=torch.float64)
    _, loss, logs = loss_and_logs(window, real, fake, per_frame=per_frame)
    assert logs["w"].item() < 1 and loss > 0
    loss.backward()
    g = window.grad.flatten(2).norm(dim=-1)[0]
    assert g[K + 3] > 0 and g[:K].sum() == 0                     # the gradient reaches the jumping frame, never history


# ----------------------------------------------------------------------------- (d) a static history changes nothing

@PREDICTIONS
def test_static_history_keeps_the_data_constant_and_natural_motion_free(pred):
    still = clip((5, 5), [STAY] + [RIGHT] * 6)                   # committed frames identical, then moving right
    assert torch.equal(still[:, 0], still[:, 1])
    real, fake = pred(still), pred(still)
    per_frame, loss, logs = loss_and_logs(still, real, fake)
    mc = tr.monotonic_continuity(still[:, K:], still[:, K - 1], M, R)
    assert (mc == 0).all() and logs["w"].item() == 1 and torch.equal(loss, baseline(per_frame))
    moving = turn_window()                                       # the same deltas under a moving history: the same k
    real2 = real.clone()
    real2[:, :K] += 0.5
    still_k = loss_and_logs(still, real2, fake)[2]["k"]
    moving_k = loss_and_logs(moving, real2, fake)[2]["k"]
    assert torch.equal(still_k, moving_k) and still_k.item() == pytest.approx((3 * 256 * 0.25) ** 0.5 / M)


# ----------------------------------------------------------------------------- (e), (f) the baseline, exactly

def random_window(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 8, 3, 16, 16, generator=g), dict(real=torch.randn(2, 8, 3, 16, 16, generator=g),
                                                            fake=torch.randn(2, 8, 3, 16, 16, generator=g)))


def baseline(per_frame):
    """The LongLive baseline's loss, per_frame[:, K:].mean(), as longtune computes it: on a
    contiguous copy (a mean over a strided view may sum in another order: the last bit differs)."""
    return per_frame[:, K:].contiguous().mean()


@pytest.mark.parametrize("kw", [dict(tr_weights=False, tr_continuity=False), dict(tau=1e12), dict(tau=1e12, tr_continuity=False)])
@pytest.mark.parametrize("seed", range(5))
def test_switched_off_or_infinite_trust_is_exactly_the_baseline(kw, seed):
    window, aux = random_window(seed)
    per_frame = torch.rand(2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    loss, logs = dfl(per_frame, window, aux, K=K, m=M, **kw)
    assert torch.equal(loss, baseline(per_frame)) and torch.equal(loss, per_frame[:, torch.arange(8) >= K].mean())
    assert torch.allclose(loss, per_frame[:, K:].mean(), rtol=1e-15, atol=0)
    assert logs["w"].shape == logs["k"].shape == (2,) and (logs["k"] > 0).all()
    gate = tr.trust_weight(logs["k"], kw.get("tau", DEFAULTS["tau"]))
    assert torch.equal(logs["w"], gate)                          # the log is the one gate, also when a term is off
    assert (logs["w"] == 1).all() or kw.get("tr_weights") is False


def test_first_window_without_history_is_the_plain_mean():
    window, aux = random_window()
    per_frame = torch.rand(2, 8, dtype=torch.float64)
    loss, logs = dfl(per_frame, window, aux, K=0, m=M, tau=1e-3)
    assert torch.equal(loss, per_frame.mean()) and logs == {}
    loss, logs = dfl(per_frame[:1], window[:1], aux, K=0, m=M, tr_weights=False, tr_continuity=False)
    assert torch.equal(loss, per_frame[:1].mean()) and logs == {}


@pytest.mark.parametrize("continuity", [False, True])
def test_longtune_window_loss_with_full_trust_equals_the_baseline_exactly(continuity):
    """Value and gradient, through longtune.window_loss, the one place the window's loss is made."""
    base, aux = random_window()
    mask = torch.arange(8) >= 2
    grads = []
    for trust in (False, True):
        x = base.clone().requires_grad_()
        per_frame = ((x - 1.0) ** 2).mean(dim=(2, 3, 4)).double()
        cfg = longtune.LongtuneConfig(trust_region=trust, tau=1e12, tr_continuity=continuity)
        loss, logs = longtune.window_loss(per_frame, x, aux, mask, M, cfg)
        loss.backward()
        grads.append((loss.detach(), x.grad))
        if trust:
            assert (logs["w"] == 1.0).all()
        else:
            assert logs == {}
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert grads[0][1][:, :2].abs().max() == 0                   # the context frames get no gradient


# ----------------------------------------------------------------------------- known limits (see the report)

PALETTES = [(c, b) for c in range(len(W.colors)) for b in range(len(BACKGROUNDS))]


@pytest.mark.parametrize("palette", ["saturated", pytest.param("band", marks=pytest.mark.xfail(strict=True, reason=(
    "known limit: r = 1.4 was set on the saturated palette; on the band palette a step of yellow on grey is 1.47 m "
    "and pays a little (r = 1.5 would free it but miss the saturated world's teleports)")))])
def test_natural_motion_is_free_for_every_palette(palette):
    """m is one median over every colour pair, but one step's size depends on the colours (0.87 m to
    1.35 m saturated, 0.89 m to 1.47 m band): r = 1.4 admits every saturated one."""
    w, costly = World(palette=palette), []
    m = natural_step(w, 8, 2)
    for c, b in PALETTES:
        pos = trajectory(torch.tensor([(5, 5)]), torch.tensor([[STAY, RIGHT] + [UP] * 6]), w.speed, w.size)
        window = render(pos, w.colors[[c]], BACKGROUNDS[[b]], w.size, w.sprite)
        if tr.monotonic_continuity(window[:, K:], window[:, K - 1], m, R).max() > 0:
            costly.append((COLOR_NAMES[c], b))
    assert costly == []


@pytest.mark.xfail(strict=True, reason="known limit of pixel space, documented in trust_region.py: a teleport is "
                                       "sqrt(2) steps, 1.22 m to 1.41 m, under r m = 1.4 m for most palettes, so the "
                                       "continuity term misses it and leaves it to the trust weight")
def test_teleport_costs_for_every_palette():
    free = []
    for c, b in PALETTES:
        window = turn_window(c, b)
        window[:, K + 2:] = torch.roll(window[:, K + 2:], (8, 8), (-2, -1))
        if tr.monotonic_continuity(window[:, K:], window[:, K - 1], M, R)[0, 2] == 0:
            free.append((COLOR_NAMES[c], b))
    assert free == []


@pytest.mark.parametrize("tau", [TAU, pytest.param(1.0, marks=pytest.mark.xfail(strict=True, reason=(
    "the first default, tau = 1, missed it: a one-channel recolour (red <-> yellow, green <-> yellow) is 1.18 m on "
    "exact frames but 0.92 m once T and G are blurred, so k < 1 and w = 1; tau = 0.5 catches it")))])
def test_blurred_recolour_to_yellow_loses_trust(tau):
    window = turn_window()                                       # red: `down` would repaint it yellow (the bias)
    real, fake = blur(window.clone()), blur(window.clone())
    real[:, :K] = blur(turn_window(color=3))[:, :K]
    _, _, logs = loss_and_logs(window, real, fake, tau=tau)
    assert logs["w"].item() < 1, logs


# ----------------------------------------------------------------------------- (5') appearance conservation

def fade(window, steps, to_bg=1.0):
    """The new frames fade the last committed sprite into the background, linearly over `steps` frames."""
    last = window[:, K - 1:K]
    bg = last.flatten(3).median(-1).values[..., None, None]       # (1,1,3,1,1) the background colour
    a = torch.linspace(1, 6, 6).clamp(max=steps)[None, :, None, None, None] / steps * to_bg
    return torch.cat([window[:, :K], (1 - a) * last + a * bg], 1)


@pytest.mark.parametrize("direction", [LEFT, DOWN, UP, STAY, RIGHT])
def test_appearance_is_conserved_by_motion_in_any_direction(direction):
    window = clip((3, 9), [RIGHT] + [direction] * 6, color=2, bg=1)
    assert tr.appearance_conservation(window[:, K:], window[:, K - 1], M, 0.0).max() < 1e-12   # 0 up to summation order


def test_a_slow_fade_escapes_continuity_but_not_appearance():
    window = fade(turn_window(color=2), steps=6)                  # blue sprite fading over 6 frames
    assert (tr.monotonic_continuity(window[:, K:], window[:, K - 1], M, R) == 0).all()   # every step is small
    ac = tr.appearance_conservation(window[:, K:], window[:, K - 1], M, 0.1)[0]
    assert ac[0] == 0 and ac[-1] > 0 and (ac[1:] >= ac[:-1]).all(), ac   # it accumulates against the history


@pytest.mark.parametrize("change", ["recolour", "background"])
def test_a_recolour_or_background_change_costs_appearance(change):
    window = turn_window(color=2)
    other = turn_window(color=1) if change == "recolour" else turn_window(color=2, bg=2)
    window = torch.cat([window[:, :K + 2], other[:, K + 2:]], 1)  # the change at the third new frame
    ac = tr.appearance_conservation(window[:, K:], window[:, K - 1], M, 0.1)[0]
    assert (ac[:2] == 0).all() and (ac[2:] > 0).all(), ac


def test_appearance_term_only_joins_the_gated_continuity():
    window = fade(turn_window(color=2), steps=3).requires_grad_(True)
    real, fake = blur(window.detach()), blur(window.detach())
    per_frame = torch.rand(window.shape[:2], generator=torch.Generator().manual_seed(0))
    full, _ = dfl(per_frame, window, dict(real=real, fake=fake), K=K, m=M, tau=1e12, tr_appearance=True)
    assert torch.equal(full, baseline(per_frame))                # w = 1: no continuity, with or without (5')
    fake = fake.clone()
    fake[:, :K] += 1.0                                           # distrust: w < 1
    low, logs = dfl(per_frame, window, dict(real=real, fake=fake), K=K, m=M, tr_appearance=True)
    off, _ = dfl(per_frame, window, dict(real=real, fake=fake), K=K, m=M, tr_appearance=False)
    assert logs["w"].item() < 1 and low > off                    # the fade costs only with the appearance term
    low.backward()
    assert window.grad[:, :K].abs().max() == 0 and window.grad[:, K:].abs().max() > 0
