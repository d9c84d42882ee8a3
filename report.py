"""One self-contained HTML page that shows a run to a person: its config, its curves, what the policy said
about which image during PPO (with the reward's parts), and the evaluated answers side by side per model
with the judge's rating and, in the tiny world, every claim marked true or false against the scene graph.

    python report.py tiny_out                  # the tiny pipeline's folder -> tiny_out/report.html
    python report.py runs/ppo                  # one stage run (sft, reward_model, ppo)
    python report.py results/mmhal.json        # one eval_mmhal.py result -> results/mmhal.report.html
    python report.py tiny_out --out /tmp/r.html

What it shows is found by walking the folder, by the files present, not by names: a stage run is a
folder with metrics.jsonl, samples.jsonl or ckpt_*.pt (its config is read from the newest checkpoint,
or rm_config.json); an evaluation is a JSON file whose object starts with eval_mmhal.py's "summary" and
holds "items"; pipeline_table.txt and any *.png / *.svg are shown as they are. The page opens from disk
with no server, no network and no script: pictures and images are embedded as data: URIs (images shrunk
to thumbnails), so it can be copied or mailed alone.
"""
from __future__ import annotations

import base64
import datetime
import html
import io
import json
import os
import sys
from dataclasses import dataclass

import common
import plots

SKIP_DIRS = {"images", "final", "best", "policy_adapter", "tb", "__pycache__", ".git"}   # hold no runs
THUMB = 192            # longest side of an embedded image, pixels
GALLERY_STEPS = 10     # PPO steps shown when the run logged more samples than max_samples


@dataclass
class ReportConfig:
    out: str = ""                 # the HTML file to write; default RUN_DIR/report.html (a result file: <stem>.report.html)
    max_samples: int = 120        # PPO samples shown per run; more: all samples of GALLERY_STEPS steps spread over training
    max_items: int = 0            # evaluation items shown per group; 0 = all


# ----------------------------------------------------------------------------------------------------
# Finding what a folder holds.

def is_stage_run(d: str) -> bool:
    names = os.listdir(d)
    return "metrics.jsonl" in names or "samples.jsonl" in names or any(common.checkpoint_step(n) for n in names)


def is_eval_result(path: str) -> bool:
    """An eval_mmhal.py result: a JSON object whose first key is "summary" (read from its first bytes, so
    that large data files are never loaded to find out)."""
    if not path.endswith(".json") or path.endswith(".answers.json"):
        return False
    with open(path, "rb") as f:
        head = f.read(256).lstrip()
    return head.startswith(b"{") and head[1:].lstrip().startswith(b'"summary"')


def discover(root: str) -> dict:
    """{"runs": stage run folders, "evals": result files, "pictures": *.png / *.svg outside image folders,
    "tables": pipeline_table.txt files}, each sorted by path."""
    found: dict[str, list[str]] = {"runs": [], "evals": [], "pictures": [], "tables": []}
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS and not x.endswith(".tmp"))
        if is_stage_run(d):
            found["runs"].append(d)
        for f in sorted(files):
            p = os.path.join(d, f)
            if f.endswith(".json") and is_eval_result(p):
                found["evals"].append(p)
            elif f.endswith((".png", ".svg")) and not f.startswith("report"):
                found["pictures"].append(p)
            elif f == "pipeline_table.txt":
                found["tables"].append(p)
    return found


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON-lines log; a line torn by a kill is skipped (the stages' own rule)."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


def run_config(d: str) -> tuple[dict, str]:
    """A stage run's config and where it came from: the newest checkpoint's (memory-mapped: its tensors are
    not read), else a reward model's rm_config.json. ({}, "") when neither is there."""
    for ck in reversed(common._checkpoints(d)):
        try:
            import torch
            state = torch.load(ck, map_location="cpu", weights_only=True, mmap=True)
        except Exception:   # noqa: BLE001 - a corrupt or foreign file: try the one before
            continue
        if isinstance(state, dict) and isinstance(state.get("config"), dict):
            return state["config"], os.path.basename(ck)
    for sub in ("best", "final", "."):
        p = os.path.join(d, sub, "rm_config.json")
        if os.path.isfile(p):
            with open(p, encoding="utf-8") as f:
                return json.load(f), os.path.relpath(p, d)
    return {}, ""


def run_kind(cfg: dict, metrics: list[dict], samples: list[dict]) -> str:
    keys = set().union(*metrics) if metrics else set()
    if samples or "rollout_batch" in cfg or "kl" in keys:
        return "ppo"
    if "facts" in cfg or "rm_request" in cfg or "train_accuracy" in keys:
        return "reward model"
    if "mode" in cfg:
        return {"lora": "rl-init (lora)", "pretrain": "pretrain"}.get(cfg["mode"], "sft")
    return "run"


# ----------------------------------------------------------------------------------------------------
# Curves from metrics.jsonl, in groups of like quantities.

GROUPS = [  # (title, rule on a key), first match wins; every key left over gets a chart of its own
    ("loss", lambda k: k.endswith("loss") and k not in ("pg_loss", "vf_loss")),
    ("PPO losses", lambda k: k in ("pg_loss", "vf_loss")),
    ("reward and its parts", lambda k: k in ("reward", "rm_score") or k.startswith("sym_") or k.endswith("_reward")),
    ("accuracy", lambda k: "accuracy" in k),
    ("KL", lambda k: k in ("kl", "approx_kl")),
    ("seconds per phase", lambda k: k.startswith("t_")),
    ("learning rate", lambda k: k == "lr"),
]


def metric_groups(metrics: list[dict]) -> list[tuple[str, list[str]]]:
    """[(title, keys)] for the numeric keys logged (in the order first seen); a key logged 3 or more times
    with one value throughout (skipped 0, a fixed kl_coef) is left out."""
    keys: list[str] = []
    for m in metrics:
        keys += [k for k, v in m.items() if k != "step" and k not in keys and isinstance(v, (int, float))
                 and not isinstance(v, bool)]
    def constant(k: str) -> bool:
        vals = [m[k] for m in metrics if m.get(k) is not None]
        return len(vals) >= 3 and len(set(vals)) == 1
    varying = [k for k in keys if not constant(k)]
    out: dict[str, list[str]] = {}
    for k in varying:
        title = next((t for t, rule in GROUPS if rule(k)), k)
        out.setdefault(title, []).append(k)
    return list(out.items())


def curves_png(metrics: list[dict], extra: list[plots.LineChart] = ()) -> str:
    """All curves of a run as one PNG grid, as a data: URI ("" when nothing was logged)."""
    charts = [plots.LineChart(title, {k: ([m["step"] for m in metrics if "step" in m],
                                          [m.get(k) for m in metrics if "step" in m]) for k in keys},
                              xlabel="step") for title, keys in metric_groups(metrics)]
    charts += list(extra)
    if not charts:
        return ""
    return picture_uri(charts, cols=3)


def picture_uri(charts: list, cols: int = 1, size: tuple[int, int] = (420, 300)) -> str:
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = plots.save(charts, os.path.join(tmp, "c.png"), cols=cols, size=size)
        with open(path, "rb") as f:
            return "data:image/png;base64," + base64.b64encode(f.read()).decode()


# ----------------------------------------------------------------------------------------------------
# Images and claims.

def image_uri(path: str | None) -> str:
    """An image file as a small embedded PNG (tiny images kept pixel for pixel, photos shrunk to THUMB
    and stored as JPEG); "" when there is no such file or it is not an image."""
    if not path or not os.path.isfile(path):
        return ""
    try:
        from PIL import Image
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB, THUMB))
            buf = io.BytesIO()
            photo = im.width * im.height > 128 * 128
            im.save(buf, "JPEG" if photo else "PNG", quality=85)
    except (OSError, ValueError):
        return ""
    return f"data:image/{'jpeg' if photo else 'png'};base64," + base64.b64encode(buf.getvalue()).decode()


def claims_html(scene: dict | None, answer: str, question: str) -> str:
    """Each claim of `answer` marked true or false against the tiny world's scene graph ("" without a scene)."""
    if not scene:
        return ""
    import tinyworld   # the tiny world only where there is one
    v = tinyworld.verify(scene, answer, question)
    if not v.claims:
        return '<div class="claims none">no checkable claim</div>'
    rows = [f'<li class="true">&#10003; {esc(tinyworld.claim_text(c))}</li>' for c in v.true]
    rows += [f'<li class="false">&#10007; {esc(tinyworld.claim_text(c))}</li>' for c in v.false]
    return (f'<ul class="claims" title="{v.n_true} true, {v.n_false} false">' + "".join(rows) + "</ul>")


def gold_share(scene: dict | None, answer: str, question: str) -> float | None:
    """Share of an answer's claims that the scene makes true (None without a scene or a claim)."""
    if not scene:
        return None
    import tinyworld
    v = tinyworld.verify(scene, answer, question)
    return v.n_true / len(v.claims) if v.claims else None


def esc(x) -> str:
    return html.escape(str(x))


def num(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else esc(v)


def img_tag(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{esc(alt)}" class="thumb">' if uri else f'<div class="noimg">{esc(alt)}: not found</div>'


# ----------------------------------------------------------------------------------------------------
# Sections.

def config_table(cfg: dict, source: str) -> str:
    if not cfg:
        return "<p>no config found (no checkpoint or rm_config.json)</p>"
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(repr(v))}</td></tr>" for k, v in cfg.items())
    return f"<details><summary>config ({esc(source)}, {len(cfg)} keys)</summary><table class=kv>{rows}</table></details>"


def pick_samples(samples: list[dict], limit: int) -> list[dict]:
    """All samples when there are at most `limit`, else every sample of GALLERY_STEPS steps spread evenly
    over training (the first and the last included), so that the gallery shows the policy change."""
    if len(samples) <= limit:
        return samples
    steps = sorted({s.get("step") for s in samples if isinstance(s.get("step"), (int, float))})
    if not steps:
        return samples[:limit]
    n = min(GALLERY_STEPS, len(steps))
    chosen = {steps[round(i * (len(steps) - 1) / max(1, n - 1))] for i in range(n)}
    per = max(1, limit // n)
    out, count = [], {}
    for s in samples:
        if s.get("step") in chosen and count.get(s["step"], 0) < per:
            count[s["step"]] = count.get(s["step"], 0) + 1
            out.append(s)
    return out


def load_scenes(image_folder: str) -> dict:
    """The tiny world's scene graphs ({image file name: scene}) from scenes.json beside the image folder."""
    for d in (image_folder, os.path.dirname(os.path.normpath(image_folder))):
        p = os.path.join(d, "scenes.json")
        if image_folder and os.path.isfile(p):
            with open(p, encoding="utf-8") as f:
                scenes = json.load(f)
            return scenes if isinstance(scenes, dict) else {}
    return {}


def gallery(samples: list[dict], image_folder: str, scenes: dict, limit: int) -> str:
    shown = pick_samples(samples, limit)
    cards = []
    for s in shown:
        name = str(s.get("image") or "")
        scene = scenes.get(name) or scenes.get(os.path.basename(name))
        parts = " ".join(f'<span class="part">{esc(k)} {num(v)}</span>' for k, v in s.items()
                         if k not in ("step",) and isinstance(v, (int, float)) and not isinstance(v, bool))
        cards.append(f'<div class="card"><div class="step">step {esc(s.get("step"))} &middot; {esc(s.get("id", ""))}</div>'
                     f'{img_tag(image_uri(os.path.join(image_folder, name)) if name else "", name or "no image")}'
                     f'<div class="q">{esc(s.get("question", ""))}</div><div class="a">{esc(s.get("response", ""))}</div>'
                     f'<div class="parts">{parts}</div>{claims_html(scene, str(s.get("response", "")), str(s.get("question", "")))}</div>')
    note = f" ({len(shown)} of {len(samples)} logged samples)" if len(shown) < len(samples) else ""
    return f'<h3>rollouts over training{note}</h3><div class="gallery">{"".join(cards)}</div>'


def proxy_vs_gold(samples: list[dict], scenes: dict) -> list[plots.LineChart]:
    """Per step: the reward model's mean score of the logged samples (the proxy) and the share of their
    claims that are true in the scene (the gold), when the tiny world's scenes are known."""
    if not scenes:
        return []
    by_step: dict = {}
    for s in samples:
        scene = scenes.get(str(s.get("image") or "")) or scenes.get(os.path.basename(str(s.get("image") or "")))
        g = gold_share(scene, str(s.get("response", "")), str(s.get("question", "")))
        by_step.setdefault(s.get("step"), []).append((s.get("rm_score"), g))
    steps = sorted(k for k in by_step if isinstance(k, (int, float)))

    def mean(vals):
        vals = [v for v in vals if isinstance(v, (int, float))]
        return sum(vals) / len(vals) if vals else None
    return [plots.LineChart("proxy (RM score) vs gold (true claims)",
                            {"rm_score": (steps, [mean(p for p, _ in by_step[k]) for k in steps]),
                             "share of claims true": (steps, [mean(g for _, g in by_step[k]) for k in steps])},
                            xlabel="step (logged samples)")]


def run_section(d: str, root: str, cfg_r: ReportConfig) -> str:
    metrics = read_jsonl(os.path.join(d, "metrics.jsonl"))
    samples = read_jsonl(os.path.join(d, "samples.jsonl"))
    cfg, source = run_config(d)
    kind = run_kind(cfg, metrics, samples)
    name = os.path.relpath(d, root) if d != root else os.path.basename(os.path.abspath(d))
    parts = [f'<section id="{esc(anchor(name))}"><h2>{esc(name)} <small>{esc(kind)}</small></h2>']
    last = metrics[-1] if metrics else {}
    if last:
        parts.append("<p>last logged step " + esc(last.get("step")) + ": " + ", ".join(
            f"{esc(k)} {num(v)}" for k, v in last.items() if k != "step" and isinstance(v, (int, float))) + "</p>")
    parts.append(config_table(cfg, source))
    image_folder = str(cfg.get("image_folder", ""))
    if samples and not os.path.isdir(image_folder):   # the run folder moved: the pipeline's data beside it
        image_folder = next((c for c in (os.path.join(root, "data", "images"),) if os.path.isdir(c)), image_folder)
    scenes = load_scenes(image_folder) if samples else {}
    uri = curves_png(metrics, proxy_vs_gold(samples, scenes))
    if uri:
        parts.append(f'<img src="{uri}" alt="curves of {esc(name)}" class="curves">')
    if samples:
        parts.append(gallery(samples, image_folder, scenes, cfg_r.max_samples))
    parts.append("</section>")
    return "\n".join(parts)


def anchor(name: str) -> str:
    return "s-" + "".join(c if c.isalnum() else "-" for c in name)


def eval_image(item: dict, index: int, cfg: dict, result_path: str) -> str:
    """An eval item's image, found as eval_mmhal.find_image finds it (the run's --image_folder, beside the
    template), then beside the result file (a moved folder)."""
    import eval_mmhal
    folder = str(cfg.get("image_folder", ""))
    template_dir = os.path.dirname(str(cfg.get("template", "")))
    for f, base in ((folder, template_dir), (os.path.join(os.path.dirname(result_path), "data", "eval", "images"), "")):
        try:
            return eval_mmhal.find_image(item, index, f, base)
        except (FileNotFoundError, OSError):
            continue
    return ""


def eval_section(paths: list[str], root: str, cfg_r: ReportConfig) -> str:
    """Evaluations of the same items side by side: the scores, the per-type bars, then per item the image,
    the question and the reference, and each model's answer with its rating, judge reply and claims."""
    docs = []
    for p in sorted(paths, key=os.path.getmtime):   # in the order they were evaluated (SFT before RLHF)
        with open(p, encoding="utf-8") as f:
            docs.append((label(p, root), p, json.load(f)))
    # results of the same questions share a table; other item sets get their own
    groups: dict[tuple, list] = {}
    for name, p, doc in docs:
        key = tuple((str(it.get("image_id", it.get("image", ""))), it.get("question", "")) for it in doc.get("items", []))
        groups.setdefault(key, []).append((name, p, doc))
    out = []
    for g, members in enumerate(groups.values()):
        names = [n for n, _, _ in members]
        out.append(f'<section id="eval-{g}"><h2>evaluation: {esc(", ".join(names))}</h2>')
        head = "".join(f"<th>{esc(n)}</th>" for n in names)
        rows = [("judge", [esc(d.get("judge", "")) for _, _, d in members]),
                ("items", [esc(d["summary"].get("count", len(d.get("items", [])))) for _, _, d in members]),
                ("average score (0-6)", [f'{d["summary"]["average"]:.2f}' for _, _, d in members]),
                ("hallucination rate", [f'{d["summary"]["hallucination_rate"]:.2f}' for _, _, d in members])]
        types = list(dict.fromkeys(t for _, _, d in members for t in d["summary"].get("per_type", {})))
        rows += [(f"&nbsp;&nbsp;{esc(t)}", [f'{d["summary"]["per_type"][t]:.2f}' if t in d["summary"]["per_type"] else "-"
                                            for _, _, d in members]) for t in types]
        out.append("<table class=scores><tr><th></th>" + head + "</tr>" + "".join(
            f"<tr><th>{k}</th>" + "".join(f"<td>{v}</td>" for v in vals) + "</tr>" for k, vals in rows) + "</table>")
        summaries = {n: d["summary"] for n, _, d in members}
        if types:
            chart = plots.BarChart("rating per question type", types,
                                   {n: [s["per_type"].get(t) for t in types] for n, s in summaries.items()},
                                   ylabel="rating (0-6)", ymin=0.0, ymax=6.0,
                                   hlines={f"{n} average": s["average"] for n, s in summaries.items()})
            out.append(f'<img src="{picture_uri([chart], size=(max(640, 60 * len(types) * len(names)), 340))}" '
                       f'alt="per-type ratings" class="curves">')
        items = members[0][2].get("items", [])
        shown = items[:cfg_r.max_items] if cfg_r.max_items else items
        cells = []
        for i, it in enumerate(shown):
            img = image_uri(eval_image(it, i, members[0][2].get("config", {}), members[0][1]))
            meta = " &middot; ".join(esc(it[k]) for k in ("question_type", "question_topic", "image_id") if it.get(k))
            answers = []
            for n, _, d in members:
                r = d["items"][i]
                rating = r.get("rating")
                cls = "bad" if isinstance(rating, int) and rating < 3 else "good"
                answers.append(f'<td><div class="a">{esc(r.get("model_answer", ""))}</div>'
                               f'<div class="rating {cls}">rating {esc(rating)}</div>'
                               f'{claims_html(r.get("scene"), str(r.get("model_answer", "")), str(r.get("question", "")))}'
                               f'<details><summary>judge</summary><pre>{esc(r.get("judge_reply", ""))}</pre></details></td>')
            cells.append(f'<tr><td class="item">{img_tag(img, str(it.get("image_id", "image")))}<div class="meta">{meta}</div>'
                         f'<div class="q">{esc(it.get("question", ""))}</div>'
                         f'<div class="gt">reference: {esc(it.get("gt_answer", ""))}</div></td>{"".join(answers)}</tr>')
        note = f" (the first {len(shown)} of {len(items)})" if len(shown) < len(items) else ""
        out.append(f"<h3>answers side by side{note}</h3><table class=answers><tr><th>item</th>{head}</tr>"
                   + "".join(cells) + "</table></section>")
    return "\n".join(out)


def label(path: str, root: str) -> str:
    rel = os.path.relpath(path, root) if os.path.isdir(root) else os.path.basename(path)
    return rel[:-5] if rel.endswith(".json") else rel


def picture_html(path: str, out_dir: str) -> str:
    """A picture the run wrote, embedded (PNG as data:, SVG inline as an <img> data: URI too)."""
    mime = "image/svg+xml" if path.endswith(".svg") else "image/png"
    with open(path, "rb") as f:
        uri = f"data:{mime};base64," + base64.b64encode(f.read()).decode()
    return f'<figure><img src="{uri}" alt="{esc(os.path.basename(path))}" class="curves"><figcaption>{esc(os.path.relpath(path, out_dir))}</figcaption></figure>'


CSS = """
body{font-family:DejaVu Sans,Arial,sans-serif;margin:20px;color:#222;max-width:1400px}
h2{border-bottom:2px solid #1f77b4;padding-bottom:3px;margin-top:36px} h2 small{color:#777;font-weight:normal}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}
table.kv td{font-family:monospace;font-size:12px} table.scores td{text-align:right}
img.thumb{width:128px;height:128px;object-fit:contain;image-rendering:pixelated;border:1px solid #aaa;background:#eee}
img.curves{max-width:100%;border:1px solid #ddd}
.gallery{display:flex;flex-wrap:wrap;gap:10px} .card{border:1px solid #ccc;border-radius:4px;padding:8px;width:260px}
.step,.meta{color:#777;font-size:12px} .q{font-weight:bold;margin:4px 0} .a{margin:4px 0;white-space:pre-wrap}
.gt{color:#555;font-size:13px} .part{display:inline-block;background:#eef;border-radius:3px;padding:1px 4px;margin:1px;font-size:12px}
ul.claims{margin:4px 0;padding-left:18px;font-size:13px} li.true{color:#1a7f2a} li.false{color:#c62828;font-weight:bold}
.claims.none{color:#777;font-size:12px} .rating{font-weight:bold} .rating.bad{color:#c62828} .rating.good{color:#1a7f2a}
.noimg{width:128px;height:128px;border:1px dashed #aaa;color:#777;font-size:11px;display:flex;align-items:center;justify-content:center;text-align:center}
table.answers td.item{width:260px} pre{white-space:pre-wrap;font-size:12px;margin:2px 0} nav a{margin-right:12px}
"""


def build_html(target: str, out_path: str, cfg_r: ReportConfig) -> str:
    """The page for `target`: a folder (walked) or one result file."""
    if os.path.isfile(target):
        if not is_eval_result(target):
            raise common.UserError(f"{target}: not an eval_mmhal.py result file (no \"summary\" first) and not a folder")
        root, found = os.path.dirname(os.path.abspath(target)), {"runs": [], "evals": [target], "pictures": [], "tables": []}
    elif os.path.isdir(target):
        root, found = target, discover(target)
    else:
        raise common.UserError(f"{target}: no such folder or file")
    if not any(found.values()):
        raise common.UserError(f"{target}: nothing to report (no metrics.jsonl, samples.jsonl, checkpoint, "
                               "eval_mmhal.py result, pipeline_table.txt or picture in it)")
    out_dir = os.path.dirname(os.path.abspath(out_path))
    body = []
    nav = [f'<a href="#{anchor(os.path.relpath(d, root))}">{esc(os.path.relpath(d, root))}</a>' for d in found["runs"]]
    nav += ['<a href="#eval-0">evaluations</a>'] if found["evals"] else []
    for t in found["tables"]:
        with open(t, encoding="utf-8") as f:
            body.append(f"<h2>{esc(os.path.relpath(t, root))}</h2><pre>{esc(f.read())}</pre>")
    if found["evals"]:
        body.append(eval_section(found["evals"], root, cfg_r))
    for d in found["runs"]:
        body.append(run_section(d, root, cfg_r))
    if found["pictures"]:
        body.append("<h2>pictures the run wrote</h2>" + "".join(picture_html(p, out_dir) for p in found["pictures"]))
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>report: {esc(os.path.abspath(target))}</title>"
            f"<style>{CSS}</style></head><body><h1>{esc(os.path.abspath(target))}</h1>"
            f"<p>report.py, {when}: {len(found['runs'])} stage runs, {len(found['evals'])} evaluations</p>"
            f"<nav>{''.join(nav)}</nav>\n" + "\n".join(body) + "\n</body></html>\n")


def default_out(target: str) -> str:
    if os.path.isfile(target):
        return (target[:-5] if target.endswith(".json") else target) + ".report.html"
    return os.path.join(target, "report.html")


def write_report(run_dir: str, out: str = "", cfg: ReportConfig | None = None) -> str:
    """Write the report of `run_dir` (a folder, or one eval result file) to `out` (default: see
    ReportConfig.out). -> the path written."""
    cfg = cfg or ReportConfig(out=out)
    out = out or cfg.out or default_out(run_dir)
    common.atomic_write_text(build_html(run_dir, out, cfg), out)
    return out


def main(argv: list[str] | None = None) -> str | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print(common.config_help(ReportConfig, prog="python report.py RUN_DIR"))
        return None
    target, rest = argv[0], argv[1:]
    if target.startswith("--"):
        raise common.ConfigError("usage: python report.py RUN_DIR [--out FILE]: the folder (or result file) comes first")
    cfg = common.parse_config(ReportConfig, rest)
    path = write_report(target, cfg.out, cfg)
    print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KiB); open it in a browser (file://{os.path.abspath(path)})")
    return path


if __name__ == "__main__":
    common.run_cli(main)
