"""bench/moe_quality.py --smoke end to end (train a tiny MoE, quantize it every way, evaluate): every row of
the table is there, its figures are finite and plausible, and the expert counts add up."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = ["float", "w4-rtn", "w4-gptq-all", "w4-gptq-routed", "w3-rtn", "w3-gptq-all", "w3-gptq-routed", "fp8-rtn",
        "w3-gptq-all-few", "w3-gptq-routed-few"]
LABELS = ["float (fp32)", "INT4 RTN", "INT4 GPTQ, all-expert calibration", "INT4 GPTQ, routed tokens only",
          "INT3 RTN", "INT3 GPTQ, all-expert calibration", "INT3 GPTQ, routed tokens only",
          "FP8 E4M3 W8A8 (RTN, per-channel)", "INT3 GPTQ, all-expert, few calibration tokens",
          "INT3 GPTQ, routed only, few calibration tokens"]
# the smoke sizes (bench/moe_quality.py PRESETS['smoke']): 1 layer, 4 experts top-2, vocabulary of SmolLM2's tokenizer
LAYERS, EXPERTS, TOP_K, CALIB_TOKENS, FEW_TOKENS, VOCAB, MIN_TOKENS = 1, 4, 2, 4 * 64, 1 * 32, 49152, 16


def test_smoke_table_has_every_row_and_finite_figures(tmp_path):
    out = tmp_path / "m"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "moe_quality.py"), "--smoke", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((out / "moe.json").read_text())
    rows = res["rows"]
    assert list(rows) == ROWS

    # the trained model: its loss went down, and the full-vocabulary model computes the trained model's loss
    train = res["model"]
    assert train["loss_last"] < train["loss_first"]
    chk = train["expansion_check_nll"]
    assert math.isclose(chk["full_model"], chk["trained_model"], rel_tol=1e-3)

    fl = rows["float"]["ppl"]
    assert math.isfinite(fl) and 1 < fl < VOCAB  # better than uniform over the vocabulary
    for name in ROWS[1:]:
        r = rows[name]
        assert math.isfinite(r["ppl"]) and 0.5 * fl < r["ppl"] < 2 * fl, (name, r["ppl"], fl)
        assert r["eval"]["tokens_scored"] > 0 and r["quantize_seconds"] >= 0
        kl = r["kl_to_float"]
        assert 0 < kl["kl"] < 1 and 0.5 < kl["top1_agree"] <= 1 and kl["positions"] > 0, (name, kl)
        bpw = r["bits_per_weight"]
        lo, hi = {"w4": (4, 6), "w3": (3, 5), "fp8": (8, 10)}[name.split("-")[0]]
        assert lo < bpw < hi, (name, bpw)  # every expert is quantized: float experts would push it past 25
        ex = r["experts"]
        assert ex["expert_linears_quantized"] == LAYERS * EXPERTS * 3, (name, ex)
        if "gptq" in name:
            tokens = FEW_TOKENS if name.endswith("-few") else CALIB_TOKENS
            assert r["calibration"]["tokens"] == tokens
            counts = ex["routed_per_container"]
            assert len(counts) == LAYERS and all(sum(c) == tokens * TOP_K for c in counts.values())
            assert ex["routed_min"] <= ex["routed_median"] <= ex["routed_max"]
            if "-all" in name:  # every token through every expert
                assert ex["stat_tokens_min"] == tokens and ex["expert_linears_fallback"] == 0
            else:  # statistics from the routed tokens only; a starved expert's 3 matrices fall back
                assert ex["stat_tokens_min"] == ex["routed_min"]
                starved = sum(1 for c in counts.values() for n in c if n < MIN_TOKENS)
                assert ex["expert_linears_fallback"] == 3 * starved, (name, counts, ex)
    assert rows["w3-rtn"]["ppl"] != fl and rows["w4-gptq-all"]["ppl"] != fl  # quantized for real

    md = (out / "moe.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| row")]
    assert [ln.split(" | ")[0][2:] for ln in table] == LABELS
    for ln in table:
        assert math.isfinite(float(ln.split(" | ")[1]))
