"""Delta Forcing's trust region (trust_region.py) on exact world frames (speed 2, m =
world.natural_step) and with x0 predictions blurred as a denoiser's would be at sigma 0.75.
The signal is the condition's verdict on the committed frames (teacher with the event minus
without it); the step keeps everything but its component along the bias direction."""
import dataclasses

import pytest
import torch

import distill
import longtune
import trust_region as tr
from world import BACKGROUNDS, COLOR_NAMES, EVENTS, World, natural_step, render, trajectory

W = World(palette="saturated")   # the palette the continuity radius was calibrated on (band: see the limits below)
B_ = World()                     # the band world, the default
M = natural_step(W, 8, 2)        # the data's natural step, about 6.79
K = 2                                                            # committed frames of an 8-frame window
RIGHT, LEFT, DOWN, UP, STAY = (EVENTS.index(e) for e in ("right", "left", "down", "up", "stay"))
R = 1.4                                                          # longtune's mc_radius
KNOBS = [f.name for f in dataclasses.fields(tr.TrustRegion) if f.init]
DEFAULTS = {k: getattr(longtune.LongtuneConfig(), k) for k in KNOBS}   # the one source of every default
TAU = DEFAULTS["tau"]


def dfl(window, grad, verdict, K=K, m=M, s0=0.0, grad_null=None, unswitched=None, real=None, anchor=None, **kw):
    """delta_forcing_loss with longtune's defaults for every knob not given, at the floor s0."""
    return tr.delta_forcing_loss(window, grad, verdict, K=K, m=m, tr=tr.TrustRegion(**(DEFAULTS | kw)), s0=s0,
                                 grad_null=grad if grad_null is None else grad_null, unswitched=unswitched,
                                 real=real, anchor=anchor)


def clip(pos0, moves, color=0, bg=0, w=W):
    """One sprite (red on dark grey by default) at pos0, then one frame per move (an event id):
    -> (1, 1 + len(moves), 3, S, S)."""
    ev = torch.tensor([[STAY] + moves])
    pos = trajectory(torch.tensor([pos0]), ev, w.speed, w.size)
    return render(pos, w.colors[[color]], BACKGROUNDS[[bg]], w.size, w.sprite)


def turn_window(color=0, bg=0, w=W):
    """K = 2 committed frames moving right, then 6 new frames moving up (a turn after a switch)."""
    return clip((5, 5), [RIGHT] + [UP] * 6, color, bg, w)


def blur(x, shrink=0.9):
    """What a denoiser predicts for x at sigma 0.75, roughly: a 3x3 circular box blur, then a
    shrink toward each frame's mean colour (both keep every channel's spatial mean)."""
    b = sum(torch.roll(x, (i, j), (-2, -1)) for i in (-1, 0, 1) for j in (-1, 0, 1)) / 9
    mean = x.mean((-2, -1), keepdim=True)
    return mean + shrink * (b - mean)


EXACT, BLURRED = (lambda x: x), blur
PREDICTIONS = pytest.mark.parametrize("pred", [EXACT, BLURRED], ids=["exact", "blurred"])


def verdict(with_event, without, n=4):
    """V of Eq. 2 from two predictions of the window, as n band levels would give it: (1,n,K,...)."""
    return (with_event[:, :K] - without[:, :K])[:, None].expand(-1, n, -1, -1, -1, -1)


def test_natural_step_of_the_world():
    assert M == pytest.approx(6.79, abs=0.01)
    x = clip((5, 5), [RIGHT])                                    # red on grey: one step is exactly m
    assert tr.frame_norm(x[:, 1:] - x[:, :1]).item() == pytest.approx(M)


# ----------------------------------------------------------------------------- (a) a turn is trusted, and kept

@PREDICTIONS
def test_a_condition_that_changes_nothing_in_history_keeps_full_trust(pred):
    window = turn_window()
    straight = clip((5, 5), [RIGHT] * 7)                         # without the event the teacher goes on right
    V = verdict(pred(window), pred(straight))                    # equal on the committed frames: the event turns only the new ones
    grad = pred(straight) - pred(window)
    loss, logs = dfl(window, grad, V)
    assert logs["w"].tolist() == [1.0] and logs["s"].tolist() == [0.0]
    assert torch.equal(loss, distill.dmd_surrogate(window, grad)[:, K:].mean())   # the baseline, exactly


@pytest.mark.parametrize("c0, c1", [(c0, c1) for c0 in range(4) for c1 in range(4) if c0 != c1])
@pytest.mark.parametrize("bg", range(len(BACKGROUNDS)))
def test_a_turn_keeps_most_of_its_step_when_the_recolour_is_flagged(c0, c1, bg):
    """Eq. 5 at w = 0 on the band world: the recolour step c0 -> c1 is removed entirely, a turn's
    step (sprite minus background, at the old and the new place) keeps its component off the
    recolour: the median pair keeps 96% of its norm, the worst (one channel shared with the
    background's offset, e.g. green on teal toward yellow) 54%, never less."""
    x, recol = turn_window(c0, bg, B_), turn_window(c1, bg, B_)
    b = (recol - x).mean((3, 4))[:, :K].mean(1)                  # the bias direction: toward c1
    w0 = torch.zeros(1)
    assert tr.flagged_step(recol - x, b, w0).abs().max() < 1e-5  # the flagged recolour: gone
    turn = clip((5, 5), [RIGHT] + [UP] * 6, c0, bg, B_) - clip((5, 5), [RIGHT] * 7, c0, bg, B_)
    kept = tr.frame_norm(tr.flagged_step(turn, b, w0))[:, K:] / tr.frame_norm(turn)[:, K:]
    assert kept.min() >= 0.53, (COLOR_NAMES[c0], COLOR_NAMES[c1], bg, kept)


@pytest.mark.parametrize("direction", [LEFT, DOWN, UP, STAY, RIGHT])
def test_one_natural_step_in_any_direction_costs_nothing(direction):
    window = clip((3, 9), [RIGHT] + [direction] * 6)
    assert (tr.monotonic_continuity(window[:, K:], window[:, K - 1], M, R) == 0).all()


# ----------------------------------------------------------------------------- (b) a condition that recolours history is not

@PREDICTIONS
@pytest.mark.parametrize("world", [W, B_], ids=["saturated", "band"])
def test_a_condition_that_recolours_the_committed_frames_loses_trust(pred, world):
    for c0 in range(4):
        for c1 in set(range(4)) - {c0}:
            window, recoloured = turn_window(c0, w=world), turn_window(c1, w=world)
            s, b = tr.transition_consistency(verdict(pred(recoloured), pred(window)), M)
            w = tr.trust_weight(s, TAU)
            assert w.item() < 0.2 and s.item() > 0.05, (COLOR_NAMES[c0], COLOR_NAMES[c1], s)
            direction = (world.colors[c1] - world.colors[c0]) / (world.colors[c1] - world.colors[c0]).norm()
            assert torch.allclose(b[0] / b[0].norm(), direction, atol=1e-5)   # b points to the condition's colour


def test_the_signal_is_the_same_on_exact_and_blurred_predictions():
    window, recoloured = turn_window(), turn_window(color=3)
    exact = tr.transition_consistency(verdict(recoloured, window), M)
    blurred = tr.transition_consistency(verdict(blur(recoloured), blur(window)), M)
    assert torch.allclose(exact[0], blurred[0], rtol=1e-5) and torch.allclose(exact[1], blurred[1], atol=1e-6)
    moved = tr.transition_consistency(verdict(torch.roll(recoloured, (3, 5), (-2, -1)), window), M)   # motion: pooled, invariant
    assert torch.allclose(exact[0], moved[0], rtol=1e-5)


def test_trust_weight_is_detached_and_bounds_the_accepted_bias():
    s = torch.tensor([0.5, 2.0, 4.0], requires_grad=True)
    w = tr.trust_weight(s, 1.0)
    assert not w.requires_grad and w.tolist() == pytest.approx([1.0, 0.5, 0.25], rel=1e-5)
    assert ((w * s).detach() <= 1.0 + 1e-5).all()                # w s never exceeds tau


def test_the_floor_bounds_the_bias_above_it():
    """DF (4) with s0: the accepted bias above the floor, w (s - s0), never exceeds tau; s0 = 0 bounds s
    itself, s under the floor is fully trusted, s0 = inf trusts every window."""
    s, tau = torch.tensor([0.004, 0.01, 0.015, 0.03]), 0.005
    assert torch.equal(tr.trust_weight(s, tau, 0.0), tr.trust_weight(s, tau))
    w = tr.trust_weight(s, tau, 0.01)
    assert w.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.25], rel=1e-3)
    assert ((w * (s - 0.01)) <= tau + 1e-6).all()
    assert (tr.trust_weight(s, tau, torch.tensor(float("inf"))) == 1.0).all()
    window, grad, V = random_window()
    _, logs = dfl(window, grad, V, s0=torch.tensor(float("inf")))
    assert (logs["w"] == 1.0).all()                              # until the floor is known: the baseline's weights


class Teacher(torch.nn.Module):
    """A stub teacher: with an event it paints the clean frames' mean plus `bias` in channel 0 (a
    recolour), without it (the null event) the mean alone; x0 = x - sigma v."""
    null_event = len(EVENTS)

    def __init__(self, bias):
        super().__init__()
        self.bias = bias

    def forward(self, x, sigma, event):
        x0 = torch.zeros_like(x)
        x0[:, :, 0] += self.bias * (event != self.null_event)[..., None, None].float()
        return (x - x0) / sigma[..., None, None, None]


def test_band_verdict_asks_each_level_and_keeps_only_the_committed_frames():
    window, ev = torch.randn(2, 8, 3, 16, 16), torch.zeros(2, 8, dtype=torch.long)
    V = tr.band_verdict(Teacher(0.3), window, ev, frames=K, levels=[0.4, 0.5, 0.55])
    assert V.shape == (2, 3, K, 3, 16, 16)
    assert torch.allclose(V[:, :, :, 0], torch.full_like(V[:, :, :, 0], 0.3), atol=1e-5) and V[:, :, :, 1:].abs().max() < 1e-5
    s, b = tr.transition_consistency(V, M)
    assert s.tolist() == pytest.approx([0.3 * 16 / M] * 2, rel=1e-4) and b[:, 0].tolist() == pytest.approx([0.3] * 2, rel=1e-4)


def test_no_gradient_reaches_history_or_the_teacher():
    window = torch.randn(1, 8, 3, 16, 16, requires_grad=True)
    grad = torch.randn(1, 8, 3, 16, 16)
    V = tr.band_verdict(Teacher(0.5), window, torch.zeros(1, 8, dtype=torch.long), frames=K, levels=[0.5])
    assert not V.requires_grad
    loss, logs = dfl(window, grad, V)
    loss.backward()
    assert logs["w"].item() < 1
    assert window.grad[:, :K].abs().max() == 0 and window.grad[:, K:].abs().max() > 0   # new frames only


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




# ----------------------------------------------------------------------------- (e), (f) the baseline, exactly

def random_window(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 8, 3, 16, 16, generator=g), torch.randn(2, 8, 3, 16, 16, generator=g), \
        torch.randn(2, 4, K, 3, 16, 16, generator=g)


@pytest.mark.parametrize("kw", [dict(tr_step=False, tr_continuity=False), dict(tau=1e12), dict(tau=1e12, tr_continuity=False),
                                dict(trust_const=1.0), dict(trust_const=1.0, tr_continuity=False)])
@pytest.mark.parametrize("seed", range(3))
def test_switched_off_or_full_trust_is_exactly_the_baseline(kw, seed):
    """Value and gradient equal distill.dmd_loss's per-frame loss masked to the new frames."""
    window, grad, V = random_window(seed)
    real = torch.randn_like(window)
    x = window.clone().requires_grad_()
    per_frame, aux = distill.dmd_loss(x, torch.zeros(2, 8, dtype=torch.long), teacher=Oracle(real), critic=Oracle(real + grad),
                                      guidance=0.0, shift=5.0)
    base = per_frame[:, K:].contiguous().mean()
    y = window.clone().requires_grad_()
    loss, logs = dfl(y, aux["grad"], V, **kw)
    assert torch.equal(loss, base)
    base.backward(), loss.backward()
    assert torch.equal(x.grad, y.grad)
    assert logs["w"].shape == logs["s"].shape == (2,) and (logs["s"] > 0).all()
    gate = torch.full((2,), kw["trust_const"]) if "trust_const" in kw else tr.trust_weight(logs["s"], kw.get("tau", TAU))
    assert torch.equal(logs["w"], gate)                          # the log is the one gate, also when a term is off


class Oracle(torch.nn.Module):
    """A stub net whose x0 is a fixed tensor whatever the noise: v = (x - x0) / sigma."""
    null_event = len(EVENTS)

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def forward(self, x, sigma, event):
        x0 = self.x0.repeat(x.shape[0] // self.x0.shape[0], 1, 1, 1, 1)
        return (x - x0) / sigma[..., None, None, None]


def test_the_constant_trust_control_differs_only_in_w():
    window, grad, V = random_window()
    adaptive, logs = dfl(window, grad, V, tau=TAU)
    const, clogs = dfl(window, grad, V, trust_const=0.5)
    assert (clogs["w"] == 0.5).all() and torch.equal(clogs["s"], logs["s"]) and not torch.equal(logs["w"], clogs["w"])
    w = logs["w"]                                                # held at each window's adaptive w, the control is Delta Forcing
    each = [dfl(window[i:i + 1], grad[i:i + 1], V[i:i + 1], trust_const=float(w[i]))[0] for i in range(len(w))]
    assert torch.allclose(adaptive, torch.stack(each).mean(), rtol=1e-6)
    one, _ = dfl(window[:1], grad[:1], V[:1], tau=TAU)
    assert torch.allclose(one, each[0], rtol=1e-6)


def test_first_window_without_history_is_the_plain_dmd_mean():
    window, grad, _ = random_window()
    loss, logs = dfl(window, grad, None, K=0, tau=1e-3)
    assert torch.equal(loss, distill.dmd_surrogate(window, grad).mean()) and logs == {}


@pytest.mark.parametrize("continuity", [False, True])
def test_longtune_window_loss_with_full_trust_equals_the_baseline_exactly(continuity):
    """Value and gradient, through longtune.window_loss, the one place the window's loss is made;
    the stub teacher's event changes nothing, so s = 0 and w = 1 at the default tau."""
    base, grad, _ = random_window()
    mask, ev = torch.arange(8) >= 2, torch.zeros(2, 8, dtype=torch.long)
    grads = []
    for trust in (False, True):
        x = base.clone().requires_grad_()
        per_frame = distill.dmd_surrogate(x, grad)
        cfg = longtune.LongtuneConfig(trust_region=trust, tr_continuity=continuity)
        knobs = tr.TrustRegion.from_config(cfg) if trust else None
        aux = dict(grad=grad, grad_null=grad, real=None)         # dmd_loss's steps (real: DF (3L) only)
        loss, logs = longtune.window_loss(per_frame, x, ev, aux, mask, teacher=Teacher(0.0), m=M,
                                          tr=knobs)
        loss.backward()
        grads.append((loss.detach(), x.grad))
        if trust:
            assert (logs["w"] == 1.0).all()
        else:
            assert logs == {}
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert grads[0][1][:, :2].abs().max() == 0                   # the context frames get no gradient


# ----------------------------------------------------------------------------- known limits (trust_region.py's docstring)

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
                                       "continuity term misses it and leaves it to the flagged step")
def test_teleport_costs_for_every_palette():
    free = []
    for c, b in PALETTES:
        window = turn_window(c, b)
        window[:, K + 2:] = torch.roll(window[:, K + 2:], (8, 8), (-2, -1))
        if tr.monotonic_continuity(window[:, K:], window[:, K - 1], M, R)[0, 2] == 0:
            free.append((COLOR_NAMES[c], b))
    assert free == []



# ----------------------------------------------------------------------------- (6') appearance conservation

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
    grad = torch.zeros_like(window)
    full, _ = dfl(window, grad, verdict(window.detach(), window.detach()), tr_appearance=True)
    assert full == 0                                             # w = 1: no continuity, with or without (6')
    biased = verdict(turn_window(color=1), turn_window(color=2))   # distrust: w < 1
    low, logs = dfl(window, grad, biased, tr_appearance=True)
    off, _ = dfl(window, grad, biased, tr_appearance=False)
    assert logs["w"].item() < 1 and low > off                    # the fade costs only with the appearance term
    low.backward()
    assert window.grad[:, :K].abs().max() == 0 and window.grad[:, K:].abs().max() > 0


@PREDICTIONS
def test_continuity_pulls_on_the_jump_once_trust_is_low(pred):
    window = jumped("teleport", 3).requires_grad_()
    V = verdict(pred(turn_window(color=1)), pred(turn_window()))  # the condition repaints history: w < 1
    loss, logs = dfl(window, torch.zeros_like(window), V)
    assert logs["w"].item() < 1 and loss > 0
    loss.backward()
    g = window.grad.flatten(2).norm(dim=-1)[0]
    assert g[K + 3] > 0 and g[:K].sum() == 0                     # the gradient reaches the jumping frame, never history


# ----------------------------------------------------------------------------- DF (5'): the restoring step, and the controls

def test_the_restoring_step_interpolates_along_the_bias_direction_only():
    """Along b^ the step is w <g, b^> + (1 - w) <g0, b^>; across b^ it is g; w = 1 or g0 = g: g."""
    g = torch.Generator().manual_seed(3)
    grad, grad_null, b = torch.randn(2, 6, 3, 16, 16, generator=g), torch.randn(2, 6, 3, 16, 16, generator=g), torch.randn(2, 3, generator=g)
    w = torch.tensor([0.25, 0.7])
    out, bh = tr.restoring_step(grad, grad_null, b, w), tr.unit(b)
    along = lambda x: (x * bh).sum(2, keepdim=True)
    wb = w[:, None, None, None, None]
    assert torch.allclose(along(out), wb * along(grad) + (1 - wb) * along(grad_null), atol=1e-5)
    assert torch.allclose(out - along(out) * bh, grad - along(grad) * bh, atol=1e-5)   # across b^: untouched
    assert torch.equal(tr.restoring_step(grad, grad, b, w), grad)
    assert torch.equal(tr.restoring_step(grad, grad_null, b, torch.ones(2)), grad)


def test_the_restoring_step_turns_a_flagged_recolour_back_toward_the_history():
    """The teacher with the event paints the committed colour's neighbour (c1); without it, the
    history's colour (c0). At low trust the flagged step stops the pull; the restoring step reverses it."""
    window, recoloured = turn_window(0, w=B_), turn_window(1, w=B_)
    V = verdict(recoloured, window)
    grad, grad_null = window - recoloured, torch.zeros_like(window)   # toward c1 with the event, stay without it
    _, b = tr.transition_consistency(V, M)
    w = torch.zeros(1)
    toward = lambda step: float((-step * tr.unit(b)).sum())     # the step's pull along b^ (a step is subtracted)
    assert toward(grad) > 0 and abs(toward(tr.flagged_step(grad, b, w))) < 1e-3
    assert abs(toward(tr.restoring_step(grad, grad_null, b, w))) < 1e-3
    assert toward(tr.restoring_step(grad, -grad, b, w)) < 0      # a teacher pulling back: the step follows it


def test_full_trust_with_the_restoring_step_is_exactly_the_baseline():
    window, grad, V = random_window()
    base, _ = dfl(window, grad, V, tau=1e12, tr_continuity=False)
    restored, logs = dfl(window, grad, V, tau=1e12, tr_continuity=False, tr_restore=True, grad_null=torch.randn_like(grad))
    assert (logs["w"] == 1).all() and torch.equal(base, restored)


def test_the_shuffled_control_permutes_the_same_weights():
    window, grad, V = (torch.cat([a] * 3) for a in random_window())   # six windows
    V = V * torch.arange(1, 7.0)[:, None, None, None, None, None]   # six different s, so six different w
    _, logs = dfl(window, grad, V)
    _, slogs = dfl(window, grad, V, trust_shuffle=True)
    assert torch.equal(slogs["s"], logs["s"]) and torch.equal(slogs["w"].sort().values, logs["w"].sort().values)
    assert not torch.equal(slogs["w"], logs["w"])
    state = torch.get_rng_state()
    dfl(window, grad, V, trust_shuffle=True)
    assert torch.equal(state, torch.get_rng_state())             # its own draws: the run's RNG untouched


def test_the_schedule_control_distrusts_exactly_the_windows_of_switched_videos():
    window, grad, V = random_window()
    _, logs = dfl(window, grad, V, trust_schedule=0.3, unswitched=torch.tensor([False, True]))
    assert logs["w"].tolist() == pytest.approx([0.3, 1.0])


def test_no_gradient_reaches_a_teacher_with_parameters():
    """The verdict and the DMD targets come from a real network: after the loss's backward its
    parameters hold no gradient (the stub teachers above have none to hold)."""
    from model import ModelConfig, VideoDiT
    torch.manual_seed(0)
    teacher, critic = VideoDiT(ModelConfig(dim=32, depth=1, heads=2)), VideoDiT(ModelConfig(dim=32, depth=1, heads=2))
    for p in [*teacher.parameters(), *critic.parameters()]:
        p.data.normal_(0, 0.1)
    window = torch.randn(2, 8, 3, 16, 16, requires_grad=True)
    ev = torch.zeros(2, 8, dtype=torch.long)
    _, aux = distill.dmd_loss(window, ev, teacher=teacher, critic=critic, guidance=1.0, shift=5.0)
    V = tr.band_verdict(teacher, window, ev, frames=K, levels=[0.4, 0.5])
    loss, _ = dfl(window, aux["grad"], V, tr_restore=True, grad_null=aux["grad_null"])
    loss.backward()
    assert window.grad[:, K:].abs().max() > 0
    assert all(p.grad is None for p in [*teacher.parameters(), *critic.parameters()])


# ----------------------------------------------------------------------------- DF (6) in the default (band) world

def test_continuity_in_the_band_world_sees_backgrounds_not_recolours():
    """What DF (6) can and cannot see where training happens (the band palette, blurred predictions):
    a background change costs; a whole one-frame recolour is smaller than r m and costs nothing, and
    so, blurred, does a teleport (it costs on exact frames)."""
    window = turn_window(w=B_)
    m = natural_step(B_, 8, 2)
    cost = lambda x: tr.monotonic_continuity(x[:, K:], x[:, K - 1], m, R)[0]
    recolour, teleport, background = window.clone(), window.clone(), window.clone()
    recolour[:, K + 2:] = turn_window(color=1, w=B_)[:, K + 2:]
    teleport[:, K + 2:] = torch.roll(window[:, K + 2:], (8, 8), (-2, -1))
    background[:, K + 2:] = turn_window(bg=2, w=B_)[:, K + 2:]
    assert (cost(blur(window)) == 0).all() and (cost(blur(recolour)) == 0).all() and (cost(recolour) == 0).all()
    assert cost(blur(background))[2] > 0 and (cost(blur(background))[[0, 1, 3, 4, 5]] == 0).all()
    assert (cost(blur(teleport)) == 0).all() and cost(teleport)[2] > 0


# ----------------------------------------------------------------------------- the candidates: DF (6'') anchored, DF (3L)/(5L) literal

@pytest.mark.parametrize("c0,c1,bg", [(0, 3, 1), (2, 3, 0), (1, 2, 2)])   # the band palette's smallest and largest recolours
def test_the_anchored_appearance_sees_the_drift_that_the_last_frame_hides(c0, c1, bg):
    """A sprite recoloured before the window (c_K already drifted): (6') against c_K sees nothing,
    (6'') against the look before the switch sees every new frame, at r_a = 0.03 (a whole band
    recolour moves the pooled colour 0.066-0.115 natural steps; r_a = 0.1, (6')'s, would pass most)."""
    before, drifted = turn_window(color=c0, bg=bg, w=B_), turn_window(color=c1, bg=bg, w=B_)
    m, ra = natural_step(B_, 8, 2), 0.03
    new, anchor = drifted[:, K:], before[:, K - 1]
    assert tr.appearance_conservation(new, drifted[:, K - 1], m, ra).max() < 1e-9
    assert (tr.appearance_conservation(new, anchor, m, ra) > 0).all()
    window = drifted.clone().requires_grad_()
    low = verdict(drifted, before)                               # the condition repaints history: w < 1
    on, logs = dfl(window, torch.zeros_like(window), low, m=m, tr_anchor=True, ac_radius=ra, anchor=anchor)
    off, _ = dfl(window, torch.zeros_like(window), low, m=m, tr_anchor=False, ac_radius=ra, anchor=anchor)
    assert logs["w"].item() < 1 and on > off
    full, _ = dfl(window, torch.zeros_like(window), verdict(before, before), m=m, tr_anchor=True, ac_radius=ra,
                  anchor=anchor)
    assert full == 0                                             # w = 1: the gate gives it no weight


def test_the_stream_anchor_is_the_frame_before_the_latest_switch():
    """longtune.Streams.mark_anchor on hand-made events: first frame at a video's start; where new
    frames switch, the frame before the last switch among them; elsewhere kept."""
    s = longtune.Streams.__new__(longtune.Streams)
    frames = torch.arange(10.0)[None, :, None, None, None].expand(3, 10, 3, 2, 2).clone()   # frame i holds value i
    s.events = torch.tensor([[0, 0, 0, 0, 1, 1, 2, 2, 2, 2], [0] * 10, [0, 0, 0, 0, 0, 0, 0, 0, 3, 3]])
    s.context, s.t = None, 0
    s.mark_anchor(frames[:, :4], s.events[:, :4])
    assert s.anchor[:, 0, 0, 0].tolist() == [0, 0, 0]
    s.context, s.t = frames[:, 2:4], 4
    s.mark_anchor(frames[:, 4:8], s.events[:, 4:8])
    assert s.anchor[:, 0, 0, 0].tolist() == [5, 0, 0]            # switches at 4 and 6: the frame before 6
    s.context, s.t = frames[:, 6:8], 8
    s.mark_anchor(frames[:, 8:10], s.events[:, 8:10])
    assert s.anchor[:, 0, 0, 0].tolist() == [5, 0, 7]            # a switch at 8: frame 7, before the new frames


class NewFramesTeacher(Teacher):
    """The stub teacher whose event recolours only the new frames (after the K committed)."""
    def forward(self, x, sigma, event):
        v = super().forward(x, sigma, event)
        v[:, :K] = super().forward(x[:, :K], sigma[:, :K], torch.full_like(event[:, :K], self.null_event))
        return v


def test_the_window_verdict_reads_the_new_frames_too():
    """--tr_verdict=window: DF (2) over every frame of the window; a condition that repaints only the
    new frames leaves the committed verdict at full trust and lowers the window verdict's."""
    base, grad, _ = random_window()
    mask, ev = torch.arange(8) >= K, torch.zeros(2, 8, dtype=torch.long)
    w = {}
    for read in ("committed", "window"):
        knobs = tr.TrustRegion.from_config(longtune.LongtuneConfig(trust_region=True, tr_verdict=read, tr_floor=False))
        aux = dict(grad=grad, grad_null=grad, real=None)
        _, logs = longtune.window_loss(distill.dmd_surrogate(base, grad), base, ev, aux, mask,
                                       teacher=NewFramesTeacher(0.3), m=M, tr=knobs)
        w[read] = logs["w"]
    assert (w["committed"] == 1).all() and (w["window"] < 1).all()


def test_the_literal_delta_is_the_teacher_against_the_generator_transition():
    window, real, _ = random_window()
    last = window[:, K - 1:K]
    s = tr.literal_consistency(real[:, K:], window[:, K:], M)
    implied, taken = real[:, K:] - last, window[:, K:] - last    # (T_f - c_K) against (z_f - c_K)
    assert torch.allclose(s, tr.frame_norm(implied - taken).pow(2).mean(1).sqrt() / M, atol=1e-5)


def test_the_literal_reading_bounds_the_whole_step_and_an_agreeing_teacher_is_the_baseline():
    """DF (5L): every component of the step scaled by w; a teacher that agrees with the generator
    (T = z, s = 0 below the floor) gives exactly the baseline."""
    base, grad, _ = random_window()
    grads = []
    for kw in (dict(tr_step=False), dict(), dict(real=base * 0)):
        x = base.clone().requires_grad_()
        loss, logs = dfl(x, grad, None, tr_literal=True, tr_continuity=False, **(dict(real=base) | kw))
        loss.backward()
        grads.append((x.grad, logs["w"]))
    (g0, w0), (g1, _), (g2, w2) = grads
    assert (w0 == 1).all() and torch.equal(g0, g1)               # T = z: full trust, the plain DMD gradient
    assert (w2 < 1).all() and torch.allclose(g2, w2[:, None, None, None, None] * g0, atol=1e-9)
