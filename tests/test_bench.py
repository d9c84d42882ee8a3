"""bench.py --quick end to end: one run prints the comparison table, the summary ratios the issue asks for
(PPO step vs the official way, generation vs transformers, decode step vs the bandwidth floor, the CPU
linear path, data loading with workers on and off), the scaling table over batch and response length
and its picture. What is checked is that the rows are there and the numbers are sane, never how fast."""
import importlib.util
import math
import re

import pytest
import torch

import bench
import kernels


def _ratio(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, f"no match for {pattern!r} in:\n{text}"
    return float(m.group(1))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    pytest.importorskip("transformers")
    png = tmp_path_factory.mktemp("bench") / "scaling.png"
    n = torch.get_num_threads()
    try:
        out = bench.main(["--quick", "--no-compile", "--threads", "1", "--iters", "1", "--plot", str(png)])
    finally:
        torch.set_num_threads(n)
    return out, png


def test_quick_bench_prints_the_table(quick_run):
    out, _ = quick_run
    for row in ("generate B=2", "decode steps only", "tokens identical to transformers: yes",
                "train step fwd+bwd", "train step, right padded B=2", "ours, padding mask", ": generation", ": scoring", ": update", "PPO step B=2 +8: total",
                "transformers (official way)", "ceiling", "hardware ceiling (100% of peak)",
                "CPU linear path: decode", "CPU linear path: prefill",
                "BatchLoader workers 0", "BatchLoader workers 2"):
        assert row in out, row
    assert out.splitlines()[0].startswith(f"device {kernels.cpu_model()} |")     # the header names the CPU


def test_quick_bench_summary_ratios_are_finite_and_consistent(quick_run):
    out, _ = quick_run
    s = out[out.index("summary ("):]
    ppo = _ratio(r"PPO step vs the official way: ([\d.]+)x", s)
    ours, theirs = (_ratio(r"PPO step vs the official way: [\d.]+x \(ours ([\d.e-]+) s", s),
                    _ratio(r"official way ([\d.e-]+) s;", s))
    assert math.isclose(ppo, theirs / ours, rel_tol=0.02)                      # the ratio of the two totals
    gen = _ratio(r"generation vs transformers: ours eager ([\d.]+)x", s)
    assert math.isfinite(gen) and gen > 0
    assert "ours compiled" not in s.split("generation vs transformers:")[1].splitlines()[0]   # --no-compile
    floor = _ratio(r"decode step vs the bandwidth floor \(([\d.e-]+) ms/step\)", s)
    for impl in ("ours eager", "transformers"):
        step = _ratio(rf"{impl} ([\d.e-]+) ms = [\d.]+x the floor", s)
        ratio = _ratio(rf"{impl} [\d.e-]+ ms = ([\d.]+)x the floor", s)
        assert math.isfinite(ratio) and ratio >= 1.0                           # nothing beats the floor
        assert math.isclose(ratio, step / floor, rel_tol=0.02)
    m = re.search(r"PPO update: the official way computes ([\d.]+)x ours' FLOPs", s)
    assert m and float(m.group(1)) > 1.0, s       # full logits and the vision tower per pass: more arithmetic
    # conftest pins the path (no timing in tests): the bench says so
    assert re.search(r"CPU linear path: decode (packed|mkl) \(env\), prefill (packed|mkl) \(env\)", s)
    m = re.search(r"fake step ([\d.]+) ms\): workers 0 ([\d.]+) ms/step, workers 2 ([\d.]+) ms/step \(([\d.]+)x\)", s)
    assert m, s
    fake, w0, w2, speedup = map(float, m.groups())
    assert w0 >= fake and w2 >= fake                                           # each step holds the fake step
    assert math.isclose(speedup, w0 / w2, rel_tol=0.05)


def test_quick_bench_scaling_table_and_plot(quick_run):
    out, png = quick_run
    table = out[out.index("| sweep | batch |"):].splitlines()
    rows = [r for r in table[2:] if r.startswith("| ")]
    got = []
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        sweep, batch, new = cells[0], int(cells[1]), int(cells[2].split()[0])
        got.append((sweep, batch, new))
        g_ours, g_hf, g_x, p_ours, p_hf, p_x = cells[3:9]
        for a, b, x in ((g_ours, g_hf, g_x), (p_ours, p_hf, p_x)):
            a, b, x = float(a), float(b), float(x.rstrip("x"))
            assert a > 0 and b > 0 and math.isfinite(x)
            assert math.isclose(x, b / a, rel_tol=0.05, abs_tol=0.01)         # speed-up = theirs / ours
    # --quick's grid: batches 1, 4 and the config's 2 at +8; +4, +16 and the config's +8 at batch 2
    assert got == [("batch", 1, 8), ("batch", 2, 8), ("batch", 4, 8),
                   ("length", 2, 4), ("length", 2, 8), ("length", 2, 16)]
    assert sum("(main table)" in r for r in rows) == 2
    if importlib.util.find_spec("PIL") is not None:
        assert f"plot: {png}" in out
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scaling_points_hold_the_config_point_once_per_sweep():
    cfg = bench.replace(bench.QUICK, batch=8, new_tokens=64)
    assert bench.scaling_points((1, 4, 16), (32, 128), cfg) == [
        ("batch", 1, 64), ("batch", 4, 64), ("batch", 8, 64), ("batch", 16, 64),
        ("length", 8, 32), ("length", 8, 64), ("length", 8, 128)]
    assert bench.scaling_points((8,), (64,), cfg) == [("batch", 8, 64), ("length", 8, 64)]


def test_bad_scaling_flag_is_refused():
    with pytest.raises(SystemExit, match="--scaling 'some'"):
        bench.main(["--quick", "--scaling", "some"])


def test_update_bound_closed_form():
    """The FLOP/s a 2.5x step needs of ours' update: the official total / 2.5, less ours' generation and
    scoring, is the time left for ours' update's FLOPs."""
    import bench
    res = {"ours": {"generation": 1.0, "scoring": 1.0, "update": 2.0},
           "transformers": {"generation": 3.0, "scoring": 3.0, "update": 6.0},
           "update_flops": {"ours": 2.8e12, "transformers": 4.2e12}}
    line = bench.update_bound(res, peak_flops=2e12, target=2.5)
    assert "computes 1.50x ours' FLOPs" in line               # 4.2 / 2.8
    assert "at 0.50x ours' FLOP/s (700 vs 1400 GFLOP/s)" in line   # 4.2e12 / 6 s vs 2.8e12 / 2 s
    assert "so ours' update is 3.00x as fast" in line
    assert "needs ours' update at 1000 GFLOP/s, 50% of the measured matmul peak (2000)" in line   # 2.8e12 / (12/2.5 - 2)
    res["ours"]["generation"] = 4.0                            # 4 + 1 > 12 / 2.5: no update time is left
    assert "needs more than a free update" in bench.update_bound(res, peak_flops=2e12, target=2.5)
