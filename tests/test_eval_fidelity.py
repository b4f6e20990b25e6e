"""KL divergence / top-1 agreement against a float64 reference, and word-level perplexity."""

import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quantkit.eval.fidelity import kl_divergence
from quantkit.eval.perplexity import perplexity, word_level


def _model(seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def models():
    a = _model(0)
    b = _model(0)
    with torch.no_grad():  # a perturbed copy, like a quantized model
        for p in b.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return a, b


def test_kl_zero_for_model_against_itself(models):
    a, _ = models
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(1))
    r = kl_divergence(a, a, ids, seq_len=64, windows=3, progress=False)
    assert r["kl"] == 0.0 and r["top1_agree"] == 1.0 and r["positions"] == 3 * 64


def test_kl_matches_numpy_reference(models):
    a, b = models
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(2))
    r = kl_divergence(a, b, ids, seq_len=64, windows=2, bos_token_id=7, batch_size=1, progress=False)
    rows = torch.cat([torch.full((2, 1), 7), ids[:126].view(2, 63)], 1)
    with torch.no_grad():
        la = a(input_ids=rows).logits.double().numpy()
        lb = b(input_ids=rows).logits.double().numpy()

    def logsm(x):
        m = x.max(-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))

    pa, pb = logsm(la), logsm(lb)
    kl = (np.exp(pa) * (pa - pb)).sum(-1)
    assert r["kl"] == pytest.approx(float(kl.mean()), rel=1e-6)
    assert r["kl"] > 0
    assert r["top1_agree"] == pytest.approx(float((la.argmax(-1) == lb.argmax(-1)).mean()))


class _SpaceTok:
    def decode(self, ids):
        return "".join(chr(97 + i % 26) if i % 5 else " " for i in ids)


def test_word_level_perplexity_definition(models):
    a, _ = models
    ids = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(3))
    r = perplexity(a, ids, seq_len=50, max_windows=3, bos_token_id=9, progress=False, tokenizer=_SpaceTok())
    # BOS windows score every covered token: 3 windows x 49 text tokens
    assert r["tokens_scored"] == r["tokens_covered"] == 147
    text = _SpaceTok().decode(ids[:147].tolist())
    words, nbytes = len(text.split()), len(text.encode())
    total = r["nll"] * 147
    assert r["words"] == words
    assert r["word_ppl"] == pytest.approx(math.exp(total / words))
    assert r["bits_per_byte"] == pytest.approx(total / (math.log(2) * nbytes))
    # without BOS the first token of each window only conditions: NLL is scaled to the covered span
    w = word_level(_SpaceTok(), ids[:10], nll_sum=9.0, n_scored=9)
    assert w["word_ppl"] == pytest.approx(math.exp(10.0 / w["words"]))
