"""`quantkit run` end to end on a tiny random model: results.json (schema 2, schema-1 keys kept) and report."""

import json

import pytest
import torch

from quantkit import runner
from quantkit.eval import corpora, tasks


def _tiny_folder(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"eos_token": "<eos>", "bos_token": "<bos>"})
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=fast.bos_token_id,
                      eos_token_id=fast.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)


def test_run_writes_results_and_report(tmp_path, monkeypatch):
    try:
        tasks.data_root()
    except tasks.TaskError as e:
        pytest.skip(str(e))
    model = tmp_path / "tiny"
    _tiny_folder(model)
    text = "The quick brown fox jumps over the lazy dog. " * 40
    monkeypatch.setattr(corpora, "corpus", lambda name: corpora.Corpus(name, text, {"corpus": name, "split": "t"}))
    import quantkit.api

    # RTN ignores calibration data; skip reading the Wikipedia dump for it
    monkeypatch.setattr(quantkit.api, "calibration_batch",
                        lambda tok, n, L, seed, corpus, bos: torch.randint(0, 200, (n, L)))
    out = tmp_path / "run"
    res = runner.run(str(model), ["w4a16-rtn"], str(out), device="cpu", progress=False, log=lambda *a: None,
                     eval_kwargs={"corpus": "enwiki", "seq_len": 64, "stride": None, "max_windows": 2},
                     tasks="winogrande,lambada", limit=3, kl_windows=2, generations=1)
    saved = json.loads((out / "results.json").read_text())
    assert saved["schema"] == 2 and [r["name"] for r in saved["runs"]] == ["float", "w4a16-rtn"]
    f, q = saved["runs"]
    # schema-1 keys are still there
    assert f["eval"]["ppl"] > 1 and saved["eval_settings"]["windows"] == 2 and f["bits_per_weight"] == 32.0  # float32
    assert runner.summary_rows(saved)[1]["scheme"] == "w4a16-rtn"
    # new keys
    assert f["fidelity"]["kl"] == 0.0 and f["fidelity"]["top1_agree"] == 1.0
    assert q["fidelity"]["kl"] > 0 and 0 <= q["fidelity"]["top1_agree"] <= 1
    assert f["tasks"]["winogrande"]["n"] == 3 and "acc_norm_stderr" in q["tasks"]["winogrande"]
    assert q["tasks"]["lambada"]["n"] == 3 and "ppl" in q["tasks"]["lambada"]
    assert q["layers"] and all(v["rel_err"] > 0 for v in q["layers"].values())
    assert q["calibration_tokens"] == 0  # RTN is data-free
    assert f["perplexity"]["enwiki"]["word_ppl"] > 1
    assert len(q["generations"]["text"]) == 1
    assert (out / "report.html").exists() and "w4a16-rtn" in (out / "report.md").read_text()
    assert res["report"]["html"].endswith("report.html")
