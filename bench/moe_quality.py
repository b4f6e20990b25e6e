"""MoE quality table (issue 16): a tiny mixture-of-experts LM *trained here*, then quantized.

No real pretrained MoE causal LM ships inside a PyPI package (docs/quality/moe.md says what was
searched), so this trains one on CPU for a few minutes, seeded, so that its routing is learned rather
than random, and measures perplexity with quantkit's own public API for: float; RTN W4A16; GPTQ W4A16
with ``moe.calibrate_all_experts`` on and off; the same at 3 bits; FP8 E4M3 W8A8 (RTN, data-free).

The model: a transformers 5 Mixtral (``AutoConfig.for_model`` + ``from_config``; untied embeddings; sizes by
``--preset``: cpu = hidden 128, 4 layers, 8 experts top-2, expert MLP 256, 250 steps; gpu = hidden 256, expert
MLP 512, 400 larger steps) with SmolLM2-135M's tokenizer (quantkit's bundled model; its full 49,152-token
vocabulary). Besides perplexity each row reports KL(float || quantized) per token and the mean block output
error, which separate the methods where the perplexity differences are within noise. Training text: the enwiki excerpt's even-numbered
articles (quantkit.data's "calibration" split, the one quantkit calibrates on); never the odd-numbered
evaluation articles.

Training cost on 2 CPU cores is dominated by the 49,152-way softmax, so the model is trained over a
*reduced* output set and then expanded, exactly, into the full-vocabulary model that is saved and
evaluated: the ``--train-vocab`` - 1 most frequent training tokens keep their own embedding and output
rows; every other token shares one input embedding and has an all-zero output row (logit 0). In
training those rare tokens are one class whose logit is fixed at log(n_rare) -- the log-sum-exp of
n_rare zero logits -- so the training loss *is* the full model's loss (checked after expansion: the
saved model's NLL equals the training loss on the same tokens).

    nice python bench/moe_quality.py                 # train (cached), all rows, writes docs/quality/moe.{json,md}
    python bench/moe_quality.py --smoke --out /tmp/m # < 60 s, tiny sizes, outputs under --out
    python bench/moe_quality.py --rows float,w4-rtn --force

Rows are kept in the JSON file as they finish (a killed run resumes; ``--force`` redoes them); the
trained model is cached under ``--out``/cache keyed by its settings.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# `python bench/moe_quality.py` puts bench/ first on sys.path, where bench/kernel_bench.py would shadow the PyPI
# package `kernels` that transformers >= 5.25 imports (AutoTokenizer then fails); drop bench/, add the root
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
DEFAULT_OUT = os.path.join(ROOT, "runs", "moe_quality")
DEFAULT_JSON = os.path.join(ROOT, "docs", "quality", "moe.json")
DEFAULT_MD = os.path.join(ROOT, "docs", "quality", "moe.md")


def markers(preset: str) -> tuple[str, str]:
    """The generated table's region in the Markdown file: one per preset, so the cpu and gpu tables coexist."""
    what = "bench/moe_quality.py" + ("" if preset == "cpu" else f" --preset {preset}")
    return f"<!-- table:begin ({what}) -->", f"<!-- table:end ({what}) -->"


TOKENIZER_MODEL = "smollm2-135m"

GPTQ = {"type": "gptq", "damp": 0.01, "act_order": True, "static_groups": True, "block_size": 128}
FP8 = {"type": "fp8", "dtype": "e4m3", "weight_scale": "channel", "activations": "dynamic"}


def _int(bits: int, group: int) -> dict:
    return {"type": "int", "bits": bits, "group_size": group, "sym": False}


def row_recipes(group: int) -> dict[str, dict | None]:
    """Row name -> recipe dict (None: the float model). Every recipe keeps lm_head float."""
    r: dict[str, dict | None] = {"float": None}
    for bits in (4, 3):
        r[f"w{bits}-rtn"] = {"quantizer": "rtn", "format": _int(bits, group)}
        for flag, tag in ((True, "all"), (False, "routed")):
            r[f"w{bits}-gptq-{tag}"] = {"quantizer": GPTQ, "format": _int(bits, group),
                                        "moe": {"calibrate_all_experts": flag}}
    r["fp8-rtn"] = {"quantizer": "rtn", "format": FP8}
    # few calibration tokens (``--few-calib``): the regime where routed-only statistics starve rare experts
    for bits in (3,):
        for flag, tag in ((True, "all"), (False, "routed")):
            r[f"w{bits}-gptq-{tag}-few"] = {"quantizer": GPTQ, "format": _int(bits, group),
                                            "moe": {"calibrate_all_experts": flag}, "_few": True}
    for name, rec in r.items():
        if rec is not None:
            rec["name"] = f"moe-{name}"
    return r


LABELS = {"float": "float (fp32)", "w4-rtn": "INT4 RTN", "w4-gptq-all": "INT4 GPTQ, all-expert calibration",
          "w4-gptq-routed": "INT4 GPTQ, routed tokens only", "w3-rtn": "INT3 RTN",
          "w3-gptq-all": "INT3 GPTQ, all-expert calibration", "w3-gptq-routed": "INT3 GPTQ, routed tokens only",
          "fp8-rtn": "FP8 E4M3 W8A8 (RTN, per-channel)",
          "w3-gptq-all-few": "INT3 GPTQ, all-expert, few calibration tokens",
          "w3-gptq-routed-few": "INT3 GPTQ, routed only, few calibration tokens"}

PRESETS = {
    # ~15 min on 2 busy CPU cores (training ~5 min, GPTQ's per-column loop the rest)
    "cpu": dict(hidden=128, layers=4, experts=8, top_k=2, intermediate=256, heads=4, kv_heads=2, train_vocab=4096,
                train_steps=250, train_batch=8, train_seq_len=128, calib_samples=32, calib_seq_len=256,
                few_calib=4, few_calib_seq_len=64, eval_seq_len=256, eval_windows=40, kl_windows=16, group_size=128),
    # the suggested shape, trained ~5 passes over the 346k training tokens (GPU: a few minutes)
    "gpu": dict(hidden=256, layers=4, experts=8, top_k=2, intermediate=512, heads=4, kv_heads=2, train_vocab=16384,
                train_steps=400, train_batch=16, train_seq_len=256, calib_samples=128, calib_seq_len=256,
                few_calib=4, few_calib_seq_len=64, eval_seq_len=256, eval_windows=100, kl_windows=32, group_size=128),
    "smoke": dict(hidden=64, layers=1, experts=4, top_k=2, intermediate=128, heads=4, kv_heads=2, train_vocab=512,
                  train_steps=8, train_batch=4, train_seq_len=64, calib_samples=4, calib_seq_len=64, few_calib=1,
                  few_calib_seq_len=32, eval_seq_len=64, eval_windows=2, kl_windows=2, group_size=32),
}


class MemoTokenizer:
    """The tokenizer, remembering its answers: quantkit.data.calibration_batch and quantkit.evaluate tokenize
    the whole split on every call (~300k tokens, seconds each on a busy CPU); every row here asks for the same
    text, so it is tokenized once. Everything else is the wrapped tokenizer's."""

    def __init__(self, tok):
        self._tok, self._memo = tok, {}

    def __call__(self, text, **kw):
        if not isinstance(text, str):
            return self._tok(text, **kw)
        key = (hashlib.sha256(text.encode()).hexdigest(), tuple(sorted(kw.items())))
        if key not in self._memo:
            self._memo[key] = self._tok(text, **kw)
        return self._memo[key]

    def __len__(self):
        return len(self._tok)

    def __getattr__(self, name):
        return getattr(self._tok, name)


# ---- the tiny model --------------------------------------------------------------------------------
def model_config(args, vocab_size: int):
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
                  num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                  max_position_embeddings=2048,
                  tie_word_embeddings=False, num_experts_per_tok=args.top_k, router_aux_loss_coef=args.aux_loss,
                  output_router_logits=False)
    if args.family == "mixtral":
        extra = dict(num_local_experts=args.experts, intermediate_size=args.intermediate)
    else:  # qwen3_moe
        extra = dict(num_experts=args.experts, moe_intermediate_size=args.intermediate,
                     intermediate_size=args.intermediate, head_dim=args.hidden // args.heads, norm_topk_prob=True)
    return AutoConfig.for_model(args.family, **common, **extra)


def train_settings(args) -> dict:
    keys = ("family", "device", "hidden", "layers", "experts", "top_k", "intermediate", "heads", "kv_heads", "train_vocab",
            "train_steps", "train_batch", "train_seq_len", "lr", "aux_loss", "seed")
    return {k: getattr(args, k) for k in keys}


def build_trained_model(args, tokenizer, log) -> tuple[str, dict]:
    """Train (or reuse from the cache) the tiny MoE; returns its HF folder and the training record."""
    from transformers import AutoModelForCausalLM

    from quantkit.data import tokenize_split

    settings = train_settings(args)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    dest = os.path.join(args.out, "cache", f"tiny-{args.family}-{key}")
    rec_path = os.path.join(dest, "moe_quality_train.json")
    if os.path.exists(os.path.join(dest, "config.json")) and os.path.exists(rec_path):
        with open(rec_path) as f:
            log(f"trained model: cached {dest}")
            return dest, json.load(f)
    split = tokenize_split(tokenizer, "enwiki", "calibration")  # even-numbered articles only
    toks, V = split.ids, len(tokenizer)
    K = args.train_vocab
    freq = torch.bincount(toks, minlength=V)
    keep = torch.argsort(freq, descending=True, stable=True)[:K - 1]  # own rows; class K-1 = the rest
    remap = torch.full((V,), K - 1, dtype=torch.long)
    remap[keep] = torch.arange(K - 1)
    n_rare = V - (K - 1)
    small = remap[toks]
    log(f"training text: {toks.numel():,} tokens (enwiki even-numbered articles, sha {split.text_sha256}); "
        f"{K - 1} own output rows cover {float((small < K - 1).float().mean()):.1%} of them")

    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    model = AutoModelForCausalLM.from_config(model_config(args, K)).to(dev).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warm = max(1, args.train_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, args.train_steps))))))
    g = torch.Generator().manual_seed(args.seed)
    L, B = args.train_seq_len, args.train_batch
    log_rare = math.log(n_rare)
    curve, t0 = [], time.time()
    for step in range(args.train_steps):
        starts = torch.randint(0, small.numel() - L - 1, (B,), generator=g)
        x = torch.stack([small[s:s + L + 1] for s in starts.tolist()]).to(dev)
        out = model(input_ids=x[:, :-1], output_router_logits=True)
        own = out.logits[..., :K - 1].float()  # the rare-token class K-1: log-sum-exp of n_rare zero logits
        logits = torch.cat([own, torch.full_like(own[..., :1], log_rare)], dim=-1)
        # loss of the full model: a rare target's own probability is the class's / n_rare
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, K), x[:, 1:].reshape(-1), reduction="none")
        nll = nll + (x[:, 1:].reshape(-1) == K - 1).float() * log_rare
        loss = nll.mean()
        total = loss + args.aux_loss * out.aux_loss if out.aux_loss is not None else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        curve.append(round(loss.item(), 4))
        if step % max(1, args.train_steps // 10) == 0 or step == args.train_steps - 1:
            log(f"  step {step + 1}/{args.train_steps}: loss {loss.item():.3f} (ppl {math.exp(loss.item()):.0f}), "
                f"aux {float(out.aux_loss.detach()) if out.aux_loss is not None else 0:.3f}, {time.time() - t0:.0f} s")
    train_s = time.time() - t0
    model = model.cpu().eval()

    # expand into the full-vocabulary model, exactly
    full = AutoModelForCausalLM.from_config(model_config(args, V)).eval()
    sd = {k: v for k, v in model.state_dict().items()}
    emb, head = sd.pop("model.embed_tokens.weight"), sd.pop("lm_head.weight")
    full_emb = emb[K - 1].expand(V, -1).clone()
    full_emb[keep] = emb[:K - 1]
    full_head = torch.zeros(V, head.shape[1])
    full_head[keep] = head[:K - 1]
    missing, unexpected = full.load_state_dict({**sd, "model.embed_tokens.weight": full_emb,
                                                "lm_head.weight": full_head}, strict=False)
    if missing or unexpected:
        raise SystemExit(f"expansion to the full vocabulary lost tensors: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():  # the check: the full model's NLL on training windows equals the training loss
        starts = torch.randint(0, toks.numel() - L - 1, (2,), generator=torch.Generator().manual_seed(1))
        xs = torch.stack([toks[s:s + L + 1] for s in starts.tolist()])
        nll_full = float(torch.nn.functional.cross_entropy(full(input_ids=xs[:, :-1]).logits.reshape(-1, V).float(),
                                                           xs[:, 1:].reshape(-1)))
        xr = remap[xs]
        lg = model(input_ids=xr[:, :-1]).logits.float()
        lg[..., K - 1] = log_rare
        nl = torch.nn.functional.cross_entropy(lg.reshape(-1, K), xr[:, 1:].reshape(-1), reduction="none")
        nll_small = float((nl + (xr[:, 1:].reshape(-1) == K - 1).float() * log_rare).mean())
    if abs(nll_full - nll_small) > 1e-3 * max(1.0, abs(nll_small)):
        raise SystemExit(f"expanded model's NLL {nll_full:.5f} != the trained model's {nll_small:.5f}: expansion bug")
    record = {"settings": settings, "train_seconds": round(train_s, 1), "train_tokens": args.train_steps * B * L,
              "loss_first": curve[0], "loss_last": curve[-1],
              "loss_last10_mean": round(sum(curve[-10:]) / len(curve[-10:]), 4),
              "train_text": {"split": "enwiki even-numbered articles (quantkit 'calibration' split)",
                             "tokens": int(toks.numel()), "sha256": split.text_sha256},
              "own_output_rows": K - 1, "rare_tokens_sharing_one_class": n_rare,
              "expansion_check_nll": {"full_model": round(nll_full, 5), "trained_model": round(nll_small, 5)},
              "params": sum(p.numel() for p in full.parameters()), "loss_curve": curve}
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = dest + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    full.save_pretrained(tmp, safe_serialization=True)
    tokenizer._tok.save_pretrained(tmp)
    with open(os.path.join(tmp, "moe_quality_train.json"), "w") as f:
        json.dump(record, f, indent=1)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    log(f"trained model saved: {dest} ({record['params'] / 1e6:.1f} M parameters, {train_s:.0f} s of training)")
    return dest, record


# ---- rows ---------------------------------------------------------------------------------------------
def expert_summary(qm) -> dict:
    rep = qm.report
    if rep is None:
        return {}
    routed = [int(c) for counts in rep.experts.values() for c in counts]
    ex = {n: v for n, v in rep.layers.items() if ".experts." in n}
    stat = [v.get("expert_stat_tokens") for v in ex.values() if v.get("expert_stat_tokens") is not None]
    out = {"expert_linears_quantized": len(ex),
           "expert_linears_fallback": sum(1 for v in ex.values() if "fallback" in v)}
    if routed:
        out.update(routed_min=min(routed), routed_median=statistics.median(routed), routed_max=max(routed),
                   routed_per_container={k: [int(c) for c in v] for k, v in rep.experts.items()})
    if stat:
        out.update(stat_tokens_min=min(stat), stat_tokens_median=statistics.median(stat))
    return out


def run_row(row: str, recipe: dict | None, folder: str, args, tokenizer, ref) -> dict:
    import quantkit
    from quantkit.data import calibration_batch

    t0 = time.time()
    recipe = None if recipe is None else dict(recipe)
    out: dict = {"row": row, "recipe": recipe}
    if recipe is None:
        qm = quantkit.load_any(folder)
        out["bits_per_weight"] = 32.0
    else:
        few = recipe.pop("_few", False)
        n, L = (args.few_calib, args.few_calib_seq_len) if few else (args.calib_samples, args.calib_seq_len)
        out["calibration"] = {"samples": n, "seq_len": L, "tokens": n * L}
        recipe = {**recipe, "calibration": {"samples": n, "seq_len": L, "seed": 0, "corpus": "enwiki",
                                            "batch_size": 8}}
        ids = calibration_batch(tokenizer, n, L, 0, "enwiki", None)
        tq = time.time()
        qm = quantkit.quantize(folder, recipe, calibration=ids, device=args.device, progress=False)
        out["quantize_seconds"] = round(time.time() - tq, 1)
        out["bits_per_weight"] = round(qm.bits_per_weight(), 4)
        out["quantized_layers"] = len(qm.quantized_layers())
        out["experts"] = expert_summary(qm)
        errs = [b["block_rel_err"] for b in qm.report.blocks if b.get("block_rel_err") is not None]
        out["block_rel_err_mean"] = sum(errs) / len(errs) if errs else None
        out["kl_to_float"] = kl_to_float(ref, qm, tokenizer, args)
    qm.tokenizer = tokenizer  # the folder's tokenizer is this one (saved with the model), with the memo
    te = time.time()
    ev = quantkit.evaluate(qm, seq_len=args.eval_seq_len, max_windows=args.eval_windows, device=args.device,
                           progress=False)
    out["eval_seconds"] = round(time.time() - te, 1)
    out["ppl"] = ev["ppl"]
    out["eval"] = {k: ev[k] for k in ("tokens_scored", "windows", "seq_len", "bos", "text_sha256", "split") if k in ev}
    out["seconds"] = round(time.time() - t0, 1)
    out["device"] = _device_name(args.device)
    out["date"] = datetime.date.today().isoformat()
    return out


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def kl_to_float(ref, qm, tokenizer, args) -> dict:
    """Mean KL(float || quantized) per next-token position on the first ``--kl-windows`` evaluation windows
    (quantkit.eval.fidelity): far less noisy than a perplexity difference for small quantization errors."""
    from quantkit.eval.corpora import evaluation_split
    from quantkit.eval.fidelity import kl_divergence

    ids = evaluation_split(tokenizer, "enwiki").ids
    qm.model.to(args.device)
    r = kl_divergence(ref.model.to(args.device), qm.model, ids, seq_len=args.eval_seq_len, windows=args.kl_windows,
                      device=args.device, progress=False)
    return {k: r[k] for k in ("kl", "kl_max", "top1_agree", "positions")}


# ---- output -----------------------------------------------------------------------------------------
def _atomic_write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def table_lines(results: dict, train: dict, args) -> list[str]:
    s = train["settings"]
    fl = results.get("float", {}).get("ppl")
    lines = [
        f"Model: a {s['family']} MoE trained here ({train['params'] / 1e6:.1f} M parameters: hidden {s['hidden']}, "
        f"{s['layers']} layers, {s['experts']} experts top-{s['top_k']}, expert MLP {s['intermediate']}; SmolLM2's "
        f"tokenizer, 49,152 tokens) for {s['train_steps']} steps x {s['train_batch']} x {s['train_seq_len']} tokens "
        f"({train['train_tokens']:,} tokens, {train['train_seconds']:.0f} s on {s['device']}) of the enwiki even-numbered "
        f"articles; final training loss {train['loss_last10_mean']:.2f} (mean of the last 10 steps). "
        f"Preset `{args.preset}`. INT asymmetric, group size {args.group_size}; lm_head and embeddings float; routers float. "
        f"Calibration {args.calib_samples} x {args.calib_seq_len} tokens (enwiki even articles, seed 0); rows with "
        f"*few calibration tokens*: {args.few_calib} x {args.few_calib_seq_len}. Experts with statistics from fewer "
        f"than `moe.min_tokens` = 16 tokens fall back to RTN with an MSE range search (counted per expert matrix). "
        f"Perplexity: `quantkit.evaluate(qm, seq_len={args.eval_seq_len}, max_windows={args.eval_windows})` "
        f"(enwiki odd-numbered articles, never trained or calibrated on), fp32. "
        f"Device: {', '.join(sorted({r.get('device', '') for r in results.values()}))}.",
        "",
        f"KL: mean KL(float || quantized) per position over the first {args.kl_windows} evaluation windows, in "
        f"nats (quantkit.eval.fidelity); block err: mean over blocks of the block output's relative error on "
        f"calibration inputs (quantkit's report).",
        "",
        "| row | ppl | gap to float | KL to float | top-1 agree | block err | bits/weight (blocks) "
        "| routed tokens per expert min / median / max | stat tokens per expert min | expert matrices fallen back "
        "| quantize s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in row_recipes(args.group_size):
        r = results.get(row)
        if r is None:
            continue
        gap = "" if fl is None or row == "float" else f"{r['ppl'] - fl:+.2f}"
        ex = r.get("experts", {})
        routed = (f"{ex['routed_min']} / {ex['routed_median']:g} / {ex['routed_max']}" if "routed_min" in ex
                  else ("n/a (data-free)" if row != "float" else ""))
        stat = str(ex.get("stat_tokens_min", "")) if row != "float" else ""
        fb = (f"{ex.get('expert_linears_fallback', 0)} of {ex.get('expert_linears_quantized', 0)}"
              if row != "float" else "")
        bpw = "32" if row == "float" else f"{r['bits_per_weight']:.3f}"
        kl = r.get("kl_to_float") or {}
        kls = f"{kl['kl']:.5f}" if kl else ""
        agree = f"{kl['top1_agree']:.3f}" if kl else ""
        be = f"{r['block_rel_err_mean']:.3g}" if r.get("block_rel_err_mean") is not None else ""
        lines.append(f"| {LABELS.get(row, row)} | {r['ppl']:.2f} | {gap} | {kls} | {agree} | {be} | {bpw} | {routed} | "
                     f"{stat} | {fb} | {r.get('quantize_seconds', '')} |")
    return lines


def write_outputs(results: dict, train: dict, args) -> None:
    keys = ("preset", "device", "group_size", "calib_samples", "calib_seq_len", "few_calib", "few_calib_seq_len",
            "eval_seq_len", "eval_windows", "kl_windows", "smoke")
    settings = {k: getattr(args, k) for k in keys}
    _atomic_write(args.json, json.dumps({"settings": settings, "model": train, "rows": results}, indent=1) + "\n")
    begin, end = markers(args.preset)
    table = begin + "\n" + "\n".join(table_lines(results, train, args)) + "\n" + end
    old = open(args.md).read() if os.path.exists(args.md) else ""
    if begin in old and end in old[old.index(begin):]:  # replace the generated region, keep the prose around it
        a = old.index(begin)
        b = old.index(end, a) + len(end)
        text = old[:a] + table + old[b:]
    else:
        text = (old.rstrip() + "\n\n" if old.strip() else "") + table + "\n"
    _atomic_write(args.md, text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (--preset smoke), < 60 s; outputs under --out "
                   "unless given")
    p.add_argument("--out", default=None, help=f"work folder: trained-model cache (default {DEFAULT_OUT})")
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    p.add_argument("--rows", default=None, help="comma-separated rows (default: all)")
    p.add_argument("--force", action="store_true", help="redo rows already in the JSON file")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--family", default="mixtral", choices=["mixtral", "qwen3_moe"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--aux-loss", type=float, default=0.01, help="router load-balancing loss coefficient")
    p.add_argument("--preset", choices=list(PRESETS), default="cpu",
                   help="sizes: cpu (default, ~15 min on 2 busy cores), gpu (a larger model trained longer: "
                        "use with --device cuda), smoke (= --smoke); any size option below overrides it")
    p.add_argument("--device", default="cpu", help="cpu or cuda: training, quantization and evaluation")
    p.add_argument("--kernels", action="store_true", help="on CUDA, let QuantLinear use the Triton kernels "
                   "(default: the plain dequantize path, the same arithmetic as on CPU)")
    p.add_argument("--tokenizer", default=None, help="a folder holding SmolLM2's tokenizer files (default: the "
                   "bundled smollm2-135m, converted by quantkit)")
    for k in PRESETS["cpu"]:
        p.add_argument("--" + k.replace("_", "-"), type=int, default=None,
                       help="default: " + ", ".join(f"{n} {v[k]}" for n, v in PRESETS.items()))
    args = p.parse_args(argv)
    if args.smoke:
        args.preset = "smoke"
    args.smoke = args.preset == "smoke"
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.out is None:
        args.out = DEFAULT_OUT if not args.smoke else os.path.join(DEFAULT_OUT, "smoke")
    if args.json is None:
        args.json = {"cpu": DEFAULT_JSON, "gpu": DEFAULT_JSON.replace("moe.json", "moe_gpu.json")}.get(
            args.preset, os.path.join(args.out, "moe.json"))
    if args.md is None:
        args.md = DEFAULT_MD if not args.smoke else os.path.join(args.out, "moe.md")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from quantkit.models.sources import load_tokenizer, resolve_model_dir

    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f} s] {msg}", flush=True)

    if not args.kernels:  # the plain dequantize path on every device: the same arithmetic as on CPU
        from quantkit.nn import QuantLinear

        QuantLinear._get_kernel = lambda self, device: None
    tok = load_tokenizer(args.tokenizer or resolve_model_dir(TOKENIZER_MODEL))
    if tok is None:
        raise SystemExit(f"no tokenizer could be loaded from {args.tokenizer or TOKENIZER_MODEL}")
    tokenizer = MemoTokenizer(tok)
    folder, train = build_trained_model(args, tokenizer, log)
    recipes = row_recipes(args.group_size)
    rows = list(recipes) if args.rows is None else [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in recipes]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}: rows are {', '.join(recipes)}")
    results: dict = {}
    if os.path.exists(args.json) and not args.force:
        with open(args.json) as f:
            old = json.load(f)
        if old.get("model", {}).get("settings") == train["settings"]:  # rows of this very model only
            results = old.get("rows", {})
    import quantkit

    ref = quantkit.load_any(folder)  # the float model, for KL
    for row in rows:
        if row in results and not args.force:
            log(f"{row}: done before (ppl {results[row]['ppl']:.3f}); --force redoes it")
            continue
        results[row] = r = run_row(row, recipes[row], folder, args, tokenizer, ref)
        ex = r.get("experts", {})
        log(f"{row}: ppl {r['ppl']:.3f}  bpw {r['bits_per_weight']}  routed min/median {ex.get('routed_min')}/"
            f"{ex.get('routed_median')}  fallback {ex.get('expert_linears_fallback')}  {r['seconds']} s")
        write_outputs(results, train, args)
    write_outputs(results, train, args)
    print("\n".join(table_lines(results, train, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
