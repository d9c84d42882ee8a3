"""plots.py: round ticks, line and bar charts drawn where their data says (pixels measured in the PNG),
the SVG's text, and the stages' two pictures, all without matplotlib."""
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

import plots


def test_nice_ticks_and_their_labels():
    assert plots.nice_ticks(0, 0.93) == [0, 0.5, 1.0]   # 0.93 / 4 = 0.23 -> the next of 1, 2, 5 x 10^k: 0.5
    assert plots.nice_ticks(-8, 3) == [-10, -5, 0, 5]                  # 11 / 4 = 2.75 -> step 5
    assert plots.nice_ticks(5, 5) == [4.5, 5.0, 5.5]                   # flat: widened by 10% of the value
    assert plots.nice_ticks(1, 40) == [0, 10, 20, 30, 40]
    assert plots.nice_ticks(0, 6) == [0, 2, 4, 6]                      # 6 / 4 = 1.5 -> step 2
    with pytest.raises(ValueError, match="finite"):
        plots.nice_ticks(0, float("nan"))
    assert [plots.tick_label(v, 0.25) for v in (0, 0.25, 1.5)] == ["0", "0.25", "1.50"]
    assert [plots.tick_label(v, 0.2) for v in (0.4, 1.0)] == ["0.4", "1.0"]
    assert plots.tick_label(500, 50) == "500" and plots.tick_label(-10, 5) == "-10"


def _mask(img: Image.Image, color: str) -> np.ndarray:
    """Pixels of exactly `color` (anti-aliased edges excluded): rows x columns of booleans."""
    rgb = tuple(int(color[i:i + 2], 16) for i in (1, 3, 5))
    return np.all(np.asarray(img.convert("RGB")) == rgb, axis=-1)


def _longest_run(col: np.ndarray) -> int:
    best = run = 0
    for v in col:
        run = run + 1 if v else 0
        best = max(best, run)
    return best


def test_a_line_goes_where_its_values_are_and_breaks_at_a_gap(tmp_path):
    # y falls from 10 to 0 over x 0..10: ticks 0..10 exactly, so the line runs corner to corner of the plot box
    xs = list(range(11))
    ys = [10.0 - x for x in xs]
    ys[5] = None                                      # a metric logged as null: a gap around x = 5
    chart = plots.LineChart("falling", {"loss": (xs, ys)}, xlabel="step", ylabel="loss")
    path = plots.save([chart], str(tmp_path / "c.png"), size=(400, 300))
    img = Image.open(path)
    assert img.size == (400, 300)
    _, (x0, y0, x1, y1) = plots.layout(chart, (400, 300))
    m = _mask(img, plots.PALETTE[0])
    m[: int(y0) + 60, int(x1) - 150:] = False        # the legend's swatch, top right
    rows, cols = np.nonzero(m)
    assert len(cols) > 200
    # every drawn pixel lies on the line through the box's top-left and bottom-right corners
    expect_y = y0 + (cols - x0) * (y1 - y0) / (x1 - x0)
    assert np.abs(rows - expect_y).max() <= 2.5
    assert cols.min() <= x0 + 2 and cols.max() >= x1 - 2
    # no line between x = 4 and x = 6 (the gap), but on both sides of it
    px = lambda x: x0 + (x1 - x0) * x / 10           # noqa: E731
    assert not m[:, int(px(4)) + 3: int(px(6)) - 2].any()
    assert m[:, int(px(3)):int(px(4))].any() and m[:, int(px(6)) + 1:int(px(7))].any()


def test_bars_are_as_tall_as_their_values(tmp_path):
    chart = plots.BarChart("per type", ["a", "b", "c"], {"SFT": [1.0, 2.0, 4.0], "RLHF": [3.0, None, 0.5]},
                           ymin=0, ymax=4, hlines={"SFT average": 7 / 3})
    img = Image.open(plots.save([chart], str(tmp_path / "b.png"), size=(600, 300)))
    _, (x0, y0, x1, y1) = plots.layout(chart, (600, 300))
    full = y1 - y0                                    # the height of a bar of 4 (the axis top)
    for series, values in (("SFT", [1.0, 2.0, 4.0]), ("RLHF", [3.0, None, 0.5])):
        m = _mask(img, plots.PALETTE[list(chart.series).index(series)])
        m[: int(y0) + 50, int(x1) - 120:] = False    # legend swatches
        m[:, : int(x0) + 2] = False
        slot = (x1 - x0) / 3
        for c, v in enumerate(values):
            tallest = max((_longest_run(col) for col in m[:, int(x0 + slot * c + 2): int(x0 + slot * (c + 1) - 2)].T),
                          default=0)   # the bar, not the dashes of its average line
            if v is None:
                assert tallest == 0
            else:
                assert abs(tallest - full * v / 4) <= 2, (series, c, tallest, full * v / 4)


def test_svg_holds_the_same_picture_as_text(tmp_path):
    charts = [plots.LineChart("reward", {"proxy": ([1, 2, 3], [0.1, 0.5, 0.4]), "gold": ([1, 2, 3], [0.2, 0.3, 0.6])},
                              xlabel="PPO step"),
              plots.BarChart("types", ["attribute", "counting"], {"score": [2.5, 3.0]}, hlines={"average": 2.75})]
    path = plots.save(charts, str(tmp_path / "c.svg"), cols=2, size=(400, 300))
    root = ET.parse(path).getroot()
    ns = {"s": "http://www.w3.org/2000/svg"}
    assert (root.get("width"), root.get("height")) == ("800", "300")
    texts = [t.text for t in root.iterfind(".//s:text", ns)]
    for want in ("reward", "proxy", "gold", "PPO step", "types", "attribute", "counting", "average 2.75"):
        assert want in texts, want
    lines = [p for p in root.iterfind(".//s:polyline", ns) if p.get("stroke") in plots.PALETTE[:2]
             and p.get("stroke-width") == "2"]
    assert len(lines) == 2 and all(len(p.get("points").split()) == 3 for p in lines)
    assert len([r for r in root.iterfind(".//s:rect", ns) if r.get("fill") == plots.PALETTE[0]]) == 2
    with pytest.raises(ValueError, match="must end in .png or .svg"):
        plots.save(charts, str(tmp_path / "c.jpg"))


def test_the_stages_pictures(tmp_path):
    hist = [{"reward": 0.1 * i, "kl": 0.01 * i, "response_length": 20 - i} for i in range(12)]
    img = Image.open(plots.ppo_curves(hist, str(tmp_path / "ppo_curves.png")))
    assert img.size == (3 * 420, 320)
    for k in range(3):                                # each panel has its curve
        assert _mask(img.crop((420 * k, 0, 420 * (k + 1), 320)), plots.PALETTE[0]).sum() > 100
    summary = {"average": 2.5, "per_type": {"attribute": 2.0, "counting": 3.0}}
    svg = open(plots.per_type_bars(summary, str(tmp_path / "t.svg"), "MMHal"), encoding="utf-8").read()
    assert "attribute" in svg and "average 2.50" in svg and "rating (0-6)" in svg
    both = plots.per_type_bars({"SFT": summary, "RLHF": {"average": 3.0, "per_type": {"counting": 4.0}}},
                               str(tmp_path / "t2.svg"), "MMHal")
    text = open(both, encoding="utf-8").read()
    assert "SFT average 2.50" in text and "RLHF average 3.00" in text
