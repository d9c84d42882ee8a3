"""Pictures with what requirements.txt installs: line charts (several named series, axes with ticks and
labels, a legend) and bar charts (grouped, with reference lines), written as PNG through pillow or as
SVG text, chosen by the file's extension. matplotlib is never needed.

A chart is laid out once as a list of primitives (lines, polylines, rectangles, text) in pixels; the PNG
and the SVG writers only draw those, so both show the same picture. Several charts can share one file
(save(charts, path, cols=3)): the PPO curves are three panels side by side.

    plots.save([plots.LineChart("mean reward", {"reward": (steps, rewards)}, xlabel="PPO step")], "r.png")
    plots.save([plots.BarChart("MMHal", ["attribute", "counting"], {"SFT": [2.1, 3.0], "RLHF": [2.5, 2.9]},
                               ymin=0, ymax=6, hlines={"SFT average": 2.5})], "per_type.svg")
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Sequence
from xml.sax.saxutils import escape

# matplotlib's tab10: distinct, and what readers of RL curves are used to
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]
INK, GRID, BACKGROUND = "#222222", "#dddddd", "#ffffff"
FONT_SIZE = 12


# ----------------------------------------------------------------------------------------------------
# Axes: nice tick values and their labels.

def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About `n` round tick values (steps of 1, 2 or 5 x 10^k) covering [lo, hi]: the first tick <= lo,
    the last >= hi. A flat range is widened around its value."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"nice_ticks: the range must be finite, got {lo}..{hi}")
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(1, n - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(k * step, 12) for k in range(first, last + 1)]


def tick_label(v: float, step: float) -> str:
    """A tick value with as many decimals as the step needs (0.25 -> 2, 0.5 -> 1, 50 -> 0); very large or
    tiny ones in e-form."""
    if v == 0:
        return "0"
    if abs(v) >= 1e5 or abs(step) < 1e-4:
        return f"{v:.2g}"
    d = 0
    while d < 6 and abs(step * 10 ** d - round(step * 10 ** d)) > 1e-6 * max(1.0, abs(step) * 10 ** d):
        d += 1
    return f"{v:.{d}f}"


# ----------------------------------------------------------------------------------------------------
# Charts and their layout in pixels.

@dataclass
class LineChart:
    """Named series {name: (x values, y values)}; a None or non-finite y leaves a gap in its line."""
    title: str
    series: dict[str, tuple[Sequence[float], Sequence[float | None]]]
    xlabel: str = ""
    ylabel: str = ""
    ymin: float | None = None      # fixed ends of the y axis (None: from the data)
    ymax: float | None = None


@dataclass
class BarChart:
    """Bars per category, one bar per named series in each (grouped), and labelled horizontal reference
    lines (an average, a baseline)."""
    title: str
    categories: list[str]
    series: dict[str, Sequence[float | None]]
    ylabel: str = ""
    ymin: float | None = 0.0
    ymax: float | None = None
    hlines: dict[str, float] = field(default_factory=dict)


@dataclass
class Prim:
    """One drawing primitive in pixels: kind line (pts: 2 points), poly (pts), rect (pts: 2 corners,
    filled), text (pts: 1 anchor point; anchor l/m/r horizontally, the point is the text's middle
    vertically; rotate 90 turns it to read upwards), dot (pts: 1 centre)."""
    kind: str
    pts: list[tuple[float, float]]
    color: str = INK
    width: float = 1.0
    text: str = ""
    anchor: str = "l"
    size: int = FONT_SIZE
    dash: bool = False
    rotate: int = 0


def text_width(s: str, size: int = FONT_SIZE) -> float:
    """The layout's estimate of a text's width (both writers' default sans fonts come close)."""
    return 0.6 * size * len(s)


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _axes(prims: list[Prim], box: tuple[float, float, float, float], xt: list[float] | None, yt: list[float],
          xmap, ymap, xlabel: str, ylabel: str, title: str) -> None:
    """Frame, grid, ticks with their labels, axis labels and the title of a plot area `box` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    ystep = yt[1] - yt[0] if len(yt) > 1 else 1.0
    for v in yt:
        y = ymap(v)
        prims.append(Prim("line", [(x0, y), (x1, y)], GRID))
        prims.append(Prim("text", [(x0 - 6, y)], text=tick_label(v, ystep), anchor="r", size=FONT_SIZE - 1))
    if xt is not None:
        xstep = xt[1] - xt[0] if len(xt) > 1 else 1.0
        for v in xt:
            x = xmap(v)
            prims.append(Prim("line", [(x, y1), (x, y1 + 4)], INK))
            prims.append(Prim("text", [(x, y1 + 13)], text=tick_label(v, xstep), anchor="m", size=FONT_SIZE - 1))
    prims.append(Prim("poly", [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)], INK))
    if xlabel:
        prims.append(Prim("text", [((x0 + x1) / 2, y1 + 30)], text=xlabel, anchor="m"))
    if ylabel:
        prims.append(Prim("text", [(x0 - 44, (y0 + y1) / 2)], text=ylabel, anchor="m", rotate=90))
    prims.append(Prim("text", [((x0 + x1) / 2, y0 - 26)], text=title, anchor="m", size=FONT_SIZE + 2))


def _legend(prims: list[Prim], names: list[str], x1: float, y0: float) -> None:
    """A legend box in the top right corner inside the plot area, one coloured swatch per name."""
    if not names:
        return
    w = max(text_width(n) for n in names) + 34
    h = 16 * len(names) + 8
    lx = x1 - w - 6
    prims.append(Prim("rect", [(lx, y0 + 6), (lx + w, y0 + 6 + h)], "#ffffffdd"))
    prims.append(Prim("poly", [(lx, y0 + 6), (lx + w, y0 + 6), (lx + w, y0 + 6 + h), (lx, y0 + 6 + h),
                               (lx, y0 + 6)], "#999999"))
    for i, name in enumerate(names):
        y = y0 + 18 + 16 * i
        prims.append(Prim("line", [(lx + 6, y), (lx + 24, y)], PALETTE[i % len(PALETTE)], width=3))
        prims.append(Prim("text", [(lx + 30, y)], text=name))


def layout(chart: LineChart | BarChart, size: tuple[int, int] = (640, 360)) -> tuple[list[Prim], tuple]:
    """The chart as primitives in a `size` (width, height) panel. -> (primitives, plot box x0, y0, x1, y1)."""
    w, h = size
    box = (70.0, 44.0, w - 16.0, h - 50.0)
    x0, y0, x1, y1 = box
    prims: list[Prim] = []
    if isinstance(chart, LineChart):
        xs = [float(x) for xv, _ in chart.series.values() for x in xv]
        ys = [float(y) for _, yv in chart.series.values() for y in yv if _finite(y)]
        if not xs or not ys:
            prims.append(Prim("text", [((x0 + x1) / 2, (y0 + y1) / 2)], text="(no data)", anchor="m"))
            _axes(prims, box, None, [0.0, 1.0], lambda v: x0, lambda v: y1 - (y1 - y0) * v, chart.xlabel,
                  chart.ylabel, chart.title)
            return prims, box
        xt = nice_ticks(min(xs), max(xs))
        lo = chart.ymin if chart.ymin is not None else min(ys)
        hi = chart.ymax if chart.ymax is not None else max(ys)
        yt = nice_ticks(lo, hi)
        ylo, yhi = (chart.ymin if chart.ymin is not None else yt[0]), (chart.ymax if chart.ymax is not None else yt[-1])
        yt = [v for v in yt if ylo - 1e-12 <= v <= yhi + 1e-12]
        xlo, xhi = xt[0], xt[-1]
        xmap = lambda v: x0 + (x1 - x0) * (v - xlo) / (xhi - xlo)          # noqa: E731
        ymap = lambda v: y1 - (y1 - y0) * (v - ylo) / (yhi - ylo)          # noqa: E731
        _axes(prims, box, xt, yt, xmap, ymap, chart.xlabel, chart.ylabel, chart.title)
        for i, (xv, yv) in enumerate(chart.series.values()):
            color = PALETTE[i % len(PALETTE)]
            run: list[tuple[float, float]] = []
            for x, y in list(zip(xv, yv)) + [(None, None)]:    # a gap (or the end) closes the current run
                if _finite(y) and x is not None:
                    run.append((xmap(float(x)), ymap(min(max(float(y), ylo), yhi))))
                    continue
                if len(run) > 1:
                    prims.append(Prim("poly", run, color, width=2))
                elif run:
                    prims.append(Prim("dot", run, color, width=3))
                run = []
        _legend(prims, list(chart.series), x1, y0)
        return prims, box
    # bar chart
    vals = [float(v) for sv in chart.series.values() for v in sv if _finite(v)] + list(chart.hlines.values())
    lo = chart.ymin if chart.ymin is not None else min(vals + [0.0])
    hi = chart.ymax if chart.ymax is not None else max(vals + [lo + 1.0])
    yt = nice_ticks(lo, hi)
    ylo = chart.ymin if chart.ymin is not None else yt[0]
    yhi = chart.ymax if chart.ymax is not None else yt[-1]
    yt = [v for v in yt if ylo - 1e-12 <= v <= yhi + 1e-12]
    ymap = lambda v: y1 - (y1 - y0) * (v - ylo) / (yhi - ylo)              # noqa: E731
    _axes(prims, box, None, yt, None, ymap, "", chart.ylabel, chart.title)
    n_cat, n_ser = max(1, len(chart.categories)), max(1, len(chart.series))
    slot = (x1 - x0) / n_cat
    bar = slot * 0.8 / n_ser
    fits = max((text_width(c, FONT_SIZE - 1) for c in chart.categories), default=0) < slot - 4
    for c, name in enumerate(chart.categories):
        cx = x0 + slot * (c + 0.5)
        dy = 0 if fits or c % 2 == 0 else 13         # labels too wide for their slot: two staggered rows
        prims.append(Prim("text", [(cx, y1 + 13 + dy)], text=name, anchor="m", size=FONT_SIZE - 1))
        for s, values in enumerate(chart.series.values()):
            v = values[c] if c < len(values) else None
            if not _finite(v):
                continue
            bx = x0 + slot * c + slot * 0.1 + bar * s
            top, base = ymap(min(max(float(v), ylo), yhi)), ymap(max(ylo, min(0.0, yhi)))
            prims.append(Prim("rect", [(bx + 1, min(top, base)), (bx + bar - 1, max(top, base))],
                              PALETTE[s % len(PALETTE)]))
    for k, (label, v) in enumerate(chart.hlines.items()):   # with several series, line k in series k's colour
        y = ymap(min(max(v, ylo), yhi))
        color = PALETTE[k % len(PALETTE)] if len(chart.series) > 1 else INK
        prims.append(Prim("line", [(x0, y), (x1, y)], color, width=1, dash=True))
        tx, text = x0 + 4 + 150 * k, f"{label} {v:.2f}"
        prims.append(Prim("rect", [(tx - 2, y - 15), (tx + text_width(text, FONT_SIZE - 1) + 2, y - 1)], "#ffffffcc"))
        prims.append(Prim("text", [(tx, y - 8)], text=text, color=color,
                          size=FONT_SIZE - 1))   # side by side: equal averages stay readable
    if len(chart.series) > 1:
        _legend(prims, list(chart.series), x1, y0)
    return prims, box


# ----------------------------------------------------------------------------------------------------
# Writers.

def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)     # pillow >= 10.1 with FreeType: a scalable sans
    except TypeError:                                # older pillow: its one bitmap font
        return ImageFont.load_default()


def _rgba(color: str) -> tuple[int, int, int, int]:
    c = color.lstrip("#")
    return (int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16), int(c[6:8], 16) if len(c) == 8 else 255)


def _draw_png(prims: list[Prim], img, dx: float, dy: float) -> None:
    from PIL import Image, ImageDraw
    draw = ImageDraw.Draw(img, "RGBA")
    for p in prims:
        pts = [(x + dx, y + dy) for x, y in p.pts]
        col = _rgba(p.color)
        if p.kind == "line" and p.dash:
            (ax, ay), (bx, by) = pts
            n = max(1, int(math.hypot(bx - ax, by - ay) // 6))
            for k in range(0, n, 2):
                draw.line([(ax + (bx - ax) * k / n, ay + (by - ay) * k / n),
                           (ax + (bx - ax) * (k + 1) / n, ay + (by - ay) * (k + 1) / n)], fill=col, width=int(p.width))
        elif p.kind in ("line", "poly"):
            draw.line(pts, fill=col, width=int(p.width), joint="curve")
        elif p.kind == "rect":
            (ax, ay), (bx, by) = pts
            draw.rectangle([min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)], fill=col)
        elif p.kind == "dot":
            (cx, cy), r = pts[0], p.width
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
        elif p.kind == "text":
            font = _font(p.size)
            anchor = {"l": "lm", "m": "mm", "r": "rm"}[p.anchor]
            if p.rotate:
                box = draw.textbbox((0, 0), p.text, font=font)
                tw, th = box[2] - box[0] + 4, box[3] - box[1] + 6
                tile = Image.new("RGBA", (tw, th), (0, 0, 0, 0))
                ImageDraw.Draw(tile).text((tw / 2, th / 2), p.text, fill=col, font=font, anchor="mm")
                tile = tile.rotate(p.rotate, expand=True)
                x, y = pts[0]
                img.paste(tile, (int(x - tile.width / 2), int(y - tile.height / 2)), tile)
            else:
                draw.text(pts[0], p.text, fill=col, font=font, anchor=anchor)


def _svg(prims: list[Prim], dx: float, dy: float) -> list[str]:
    out = []
    for p in prims:
        pts = [(x + dx, y + dy) for x, y in p.pts]
        col = p.color[:7]
        alpha = f' opacity="{_rgba(p.color)[3] / 255:.2f}"' if len(p.color) == 9 else ""
        if p.kind in ("line", "poly"):
            d = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            dash = ' stroke-dasharray="6,6"' if p.dash else ""
            out.append(f'<polyline points="{d}" fill="none" stroke="{col}" stroke-width="{p.width}"{dash}'
                       f' stroke-linejoin="round"{alpha}/>')
        elif p.kind == "rect":
            (ax, ay), (bx, by) = pts
            out.append(f'<rect x="{min(ax, bx):.1f}" y="{min(ay, by):.1f}" width="{abs(bx - ax):.1f}" '
                       f'height="{abs(by - ay):.1f}" fill="{col}"{alpha}/>')
        elif p.kind == "dot":
            (cx, cy) = pts[0]
            out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{p.width}" fill="{col}"/>')
        elif p.kind == "text":
            x, y = pts[0]
            anchor = {"l": "start", "m": "middle", "r": "end"}[p.anchor]
            turn = f' transform="rotate({-p.rotate} {x:.1f} {y:.1f})"' if p.rotate else ""
            out.append(f'<text x="{x:.1f}" y="{y:.1f}" font-size="{p.size}" text-anchor="{anchor}" '
                       f'dominant-baseline="central" fill="{col}"{turn}>{escape(p.text)}</text>')
    return out


def save(charts: list[LineChart | BarChart], path: str, cols: int = 1, size: tuple[int, int] = (640, 360)) -> str:
    """Write `charts` as panels of `size` pixels, `cols` per row, to `path`: .png through pillow, .svg as
    text. -> path."""
    if not charts:
        raise ValueError("plots.save: no charts")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".png", ".svg"):
        raise ValueError(f"plots.save: {path}: the file must end in .png or .svg")
    cols = max(1, min(cols, len(charts)))
    rows = (len(charts) + cols - 1) // cols
    w, h = size
    laid = [layout(c, size)[0] for c in charts]
    origin = [((i % cols) * w, (i // cols) * h) for i in range(len(charts))]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if ext == ".svg":
        body = [s for prims, (dx, dy) in zip(laid, origin) for s in _svg(prims, dx, dy)]
        text = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{cols * w}" height="{rows * h}" '
                f'viewBox="0 0 {cols * w} {rows * h}" font-family="DejaVu Sans, Arial, sans-serif">\n'
                f'<rect width="100%" height="100%" fill="{BACKGROUND}"/>\n' + "\n".join(body) + "\n</svg>\n")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path
    from PIL import Image
    img = Image.new("RGB", (cols * w, rows * h), BACKGROUND)
    for prims, (dx, dy) in zip(laid, origin):
        _draw_png(prims, img, dx, dy)
    img.save(path)
    return path


# ----------------------------------------------------------------------------------------------------
# The stages' pictures (what tinyworld.plot_ppo and eval_mmhal.plot_per_type drew with matplotlib).

def ppo_curves(hist: list[dict], path: str) -> str:
    """PPO's mean reward, KL to the reference and response length per step, three panels side by side."""
    steps = list(range(1, len(hist) + 1))
    panels = [LineChart(title, {key: (steps, [h.get(key) for h in hist])}, xlabel="PPO step")
              for key, title in (("reward", "mean reward"), ("kl", "KL to reference"),
                                 ("response_length", "response tokens"))]
    return save(panels, path, cols=3, size=(420, 320))


def per_type_bars(summary: dict | dict[str, dict], path: str, title: str) -> str:
    """MMHal ratings (0-6) per question type, with the average as a dashed line. `summary` is one
    eval_mmhal summary, or {model name: summary} for bars side by side."""
    named = {"score": summary} if "per_type" in summary else summary
    types: list[str] = []
    for s in named.values():
        types += [t for t in s["per_type"] if t not in types]
    chart = BarChart(title, types, {name: [s["per_type"].get(t) for t in types] for name, s in named.items()},
                     ylabel="rating (0-6)", ymin=0.0, ymax=6.0,
                     hlines={(f"{name} average" if len(named) > 1 else "average"): s["average"]
                             for name, s in named.items()})
    return save([chart], path, size=(max(480, 90 * len(types) * max(1, len(named)) // 2 + 120), 360))
