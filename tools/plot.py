"""The frontier as an SVG, drawn with the standard library: react against identity failures
(1 - identity) and against pull, one labelled point per checkpoint row with its 95% intervals."""

import math
from xml.sax.saxutils import escape

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
LEFT, TOP, PW, PH, GAP = 70, 70, 340, 280, 100   # first panel's corner, panel size, space between panels
CHAR = 6.5                                        # the width of one character of an 11 px label, roughly
PANELS = [("identity failures (1 - identity)", lambda m: (1 - m["identity"]["mean"], m["identity"]["ci95"])),
          ("pull", lambda m: (m["pull"]["mean"], m["pull"]["ci95"]))]


def points(result, group, x_of):
    """(row index, name, x, x interval, react, react interval) for each row with both values."""
    out = []
    for i, (name, r) in enumerate(result.items()):
        (x, dx), y, dy = x_of(r[group]), r[group]["react"]["mean"], r[group]["react"]["ci95"]
        if math.isfinite(x) and math.isfinite(y):                 # a row without a value has no point
            out.append((i, name, x, dx if math.isfinite(dx) else 0.0, y, dy if math.isfinite(dy) else 0.0))
    return out


def axis(lo, hi, a, b):
    """Round ticks covering lo..hi -> (ticks, decimals, value -> pixel between a and b)."""
    pad = (hi - lo) * 0.05 if hi - lo > 0.02 else 0.01            # room round the points; a lone one gets +- 0.01
    raw = (hi - lo + 2 * pad) / 4
    step = next(s for f in (1, 2, 5, 10) if (s := f * 10 ** math.floor(math.log10(raw))) >= raw)
    first, last = math.floor((lo - pad) / step) * step, math.ceil((hi + pad) / step) * step
    ticks = [first + k * step for k in range(round((last - first) / step) + 1)]
    return ticks, max(0, -math.floor(math.log10(step))), lambda v: a + (v - first) / (last - first) * (b - a)


def attrs(**kw):
    return "".join(f' {k.replace("_", "-")}="{round(v, 1) if isinstance(v, float) else v}"' for k, v in kw.items())


def text(x, y, s, size=11, **kw):
    return f"<text{attrs(x=x, y=y, font_size=size, **kw)}>{escape(str(s))}</text>"


def line(x1, y1, x2, y2, colour="#ddd", **kw):
    return f"<line{attrs(x1=x1, y1=y1, x2=x2, y2=y2, stroke=colour, **kw)}/>"


def dot(x, y, colour):
    return f"<circle{attrs(cx=x, cy=y, r=4.5, fill=colour)}/>"


def panel(ox, xlabel, pts, yaxis):
    """One panel, its left edge at ox -> (SVG elements, [(row, name, colour, name's box x0 y0 x1 y1, point)])."""
    (yt, yd, ypx), out, labels = yaxis, [], []
    xt, xd, xpx = axis(min((x - dx for _, _, x, dx, *_ in pts), default=0),
                       max((x + dx for _, _, x, dx, *_ in pts), default=1), ox, ox + PW)
    out += [e for t in xt for e in (line(xpx(t), TOP, xpx(t), TOP + PH + 5),
                                    text(xpx(t), TOP + PH + 18, f"{t:.{xd}f}", text_anchor="middle"))]
    out += [e for t in yt for e in (line(ox - 5, ypx(t), ox + PW, ypx(t)),
                                    text(ox - 8, ypx(t) + 4, f"{t:.{yd}f}", text_anchor="end"))]
    out += [f"<rect{attrs(x=ox, y=TOP, width=PW, height=PH, fill='none', stroke='#444')}/>",
            text(ox + PW / 2, TOP + PH + 40, xlabel, 13, text_anchor="middle"),
            text(ox - 48, TOP + PH / 2, "react", 13, text_anchor="middle",
                 transform=f"rotate(-90 {ox - 48} {TOP + PH / 2})")]
    for i, name, x, dx, y, dy in pts:
        c, px, py = COLOURS[i % len(COLOURS)], xpx(x), ypx(y)
        out += [line(xpx(x - dx), py, xpx(x + dx), py, c, stroke_width=1.5),   # the intervals as whiskers
                line(px, ypx(y - dy), px, ypx(y + dy), c, stroke_opacity=0.4), dot(px, py, c)]
        w = CHAR * len(name)
        x0 = px + 7 if px + 7 + w <= ox + PW else px - 7 - w       # right of the point, or left where it would leave
        labels.append((i, name, c, (x0, py - 18, x0 + w, py - 5), (px, py)))
    return out, labels


def crowded(boxes, left):
    """Would any of these label boxes (x0, y0, x1, y1) leave its panel on the left or overlap another?"""
    return any(b[0] < left for b in boxes) or any(a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
                                                   for k, a in enumerate(boxes) for b in boxes[k + 1:])


def frontier_svg(path, result, group="all", note=""):
    """Two panels side by side, react on a shared y axis. Each row's point is named beside it, or
    numbered with a legend below when names would collide. Rows without a value are left out."""
    pts = [points(result, group, x_of) for _, x_of in PANELS]
    ys = [v for p in pts for *_, y, dy in p for v in (y - dy, y + dy)]
    yaxis = axis(min(ys, default=0), max(ys, default=1), TOP + PH, TOP)
    body, labels, legend = [], [], False
    for p, ((xlabel, _), ps) in enumerate(zip(PANELS, pts)):
        out, lab = panel(LEFT + p * (PW + GAP), xlabel, ps, yaxis)
        body, labels = body + out, labels + lab
        legend |= crowded([box for *_, box, _ in lab], LEFT + p * (PW + GAP))
    rows = sorted({(i, name, c) for i, name, c, *_ in labels})
    num = {i: k + 1 for k, (i, _, _) in enumerate(rows)}
    body += [text(px + 7, py - 8, num[i], fill=c) if legend else text(x0, y1 - 3, name, fill=c)
             for i, name, c, (x0, _, _, y1), (px, py) in labels]
    bottom, half = TOP + PH + 60, (len(rows) + 1) // 2            # the legend: two columns, down the left one first
    if legend:
        for k, (i, name, c) in enumerate(rows):
            lx, ly = LEFT + (k // half) * (PW + GAP), bottom + 18 * (k % half)
            body += [dot(lx + 4, ly - 4, c), text(lx + 14, ly, f"{num[i]}  {name}")]
    width, height = LEFT + 2 * PW + GAP + 20, bottom + 10 + (18 * half if legend else 0)
    title = f"react against identity failures and pull ({group} schedules)"
    subtitle = "each point a row's mean, its whiskers 95% intervals" + (f"; {note}" if note else "")
    head = [f'<svg xmlns="http://www.w3.org/2000/svg"{attrs(width=width, height=height)} font-family="sans-serif">',
            f"<title>{escape(title)}</title>", f'<rect{attrs(width=width, height=height)} fill="white"/>',
            text(width / 2, 26, title, 16, text_anchor="middle", font_weight="bold"),
            text(width / 2, 46, subtitle, 12, text_anchor="middle", fill="#555")]
    with open(path, "w") as f:
        f.write("\n".join(head + body + ["</svg>"]) + "\n")
