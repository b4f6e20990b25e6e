"""Log-likelihood scoring and task metrics, checked against plain float64 computations."""

import math
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quantkit.eval import loglik, tasks
from quantkit.eval.loglik import Scored


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def _pairs(seed=0, docs=9):
    rng = random.Random(seed)
    pairs = []
    for _ in range(docs):
        ctx = [rng.randrange(256) for _ in range(rng.randint(1, 40))]
        for _ in range(rng.randint(1, 5)):
            pairs.append((ctx, [rng.randrange(256) for _ in range(rng.randint(1, 15))]))
    return pairs


def _reference(model, ctx, cont):
    """Direct computation: float64 log-softmax of one unpadded forward, summed by hand."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ctx + cont])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    ll = sum(float(lp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
    greedy = all(int(lp[len(ctx) - 1 + j].argmax()) == t for j, t in enumerate(cont))
    return ll, greedy


@pytest.mark.parametrize("pack", [True, False])
def test_scoring_equals_direct_computation(tiny, pack):
    pairs = _pairs()
    got = loglik.score_tokens(tiny, pairs, pack=pack, row_tokens=64, batch_tokens=160, progress=False)
    for s, (ctx, cont) in zip(got, pairs):
        ll, _ = _reference(tiny, ctx, cont)
        assert s.n_tokens == len(cont)
        assert s.logprob == pytest.approx(ll, abs=1e-4)


def test_is_greedy_matches_argmax(tiny):
    # a continuation built from the model's own greedy choices is greedy; flipping one token is not
    ctx = [5, 17, 99, 3]
    seq = list(ctx)
    with torch.no_grad():
        for _ in range(4):
            seq.append(int(tiny(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    cont = seq[len(ctx):]
    bad = cont[:-1] + [(cont[-1] + 1) % 256]
    got = loglik.score_tokens(tiny, [(ctx, cont), (ctx, bad)], progress=False)
    assert got[0].is_greedy and not got[1].is_greedy
    assert _reference(tiny, ctx, cont)[1] and not _reference(tiny, ctx, bad)[1]


class _IgnoresMasks(torch.nn.Module):
    """A model whose forward drops custom masks/positions: packing must detect it and fall back."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        return self.m(input_ids=input_ids, use_cache=False)


def test_packing_falls_back_when_masks_are_ignored(tiny):
    pairs = _pairs(seed=3, docs=4)
    with pytest.warns(UserWarning, match="falls back"):
        got = loglik.score_tokens(_IgnoresMasks(tiny), pairs, pack=True, row_tokens=256, progress=False)
    for s, (ctx, cont) in zip(got, pairs):
        assert s.logprob == pytest.approx(_reference(tiny, ctx, cont)[0], abs=1e-4)


class _CharTok:
    """Stand-in tokenizer: one token per character (code point mod 256)."""
    bos_token_id, eos_token_id, pad_token_id = 1, 2, None

    def __call__(self, s, add_special_tokens=False):
        class R:
            input_ids = [ord(c) % 256 for c in s]
        return R()


def test_encode_pair_moves_trailing_space_and_adds_bos():
    tok = _CharTok()
    ctx, cont = loglik.encode_pair(tok, "Question: x\nAnswer: ", "yes")
    assert ctx == [ord(c) for c in "Question: x\nAnswer:"] and cont == [ord(c) for c in " yes"]
    ctx, cont = loglik.encode_pair(tok, "ab", " c", bos_token_id=1)
    assert ctx == [1, ord("a"), ord("b")] and cont == [ord(" "), ord("c")]
    ctx, _ = loglik.encode_pair(tok, "", "c")  # empty context conditions on BOS
    assert ctx == [1]


def test_score_strings_equals_token_scoring(tiny):
    tok = _CharTok()
    reqs = [("The cat sat on the", " mat"), ("The cat sat on the", " dog"), ("Hello", " world")]
    got = loglik.score(tiny, tok, reqs, bos_token_id=1, progress=False)
    for s, (c, x) in zip(got, reqs):
        ll, _ = _reference(tiny, [1] + [ord(ch) for ch in c], [ord(ch) for ch in x])
        assert s.logprob == pytest.approx(ll, abs=1e-4)


def test_acc_norm_divides_by_answer_characters():
    # choice 0: ll -6 over "aaaaaa" (6 chars) -> -1.0/char; choice 1: ll -4 over "bb" (2 chars) -> -2.0/char
    docs = [{"doc_id": 0, "label": 0, "requests": [(0, "q", " aaaaaa"), (1, "q", " bb")]},
            {"doc_id": 1, "label": 1, "requests": [(0, "q", " aaaaaa"), (1, "q", " bb")]}]
    sc = {(0, 0): Scored(-6.0, False, 3), (0, 1): Scored(-4.0, False, 1),
          (1, 0): Scored(-6.0, False, 3), (1, 1): Scored(-4.0, False, 1)}
    m = tasks.mc_metrics(docs, sc)
    # acc picks choice 1 (higher total ll) for both docs -> right on doc 1 only
    assert m["acc"] == 0.5
    # acc_norm picks choice 0 (higher ll per char, leading space not counted) -> right on doc 0 only
    assert m["acc_norm"] == 0.5
    assert m["correct"] == "01" and m["correct_norm"] == "10"  # per document, in document order
    # counting the leading space would give -6/7 vs -4/3: still choice 0; make it decisive:
    docs2 = [{"doc_id": 0, "label": 1, "requests": [(0, "q", " aaa"), (1, "q", " b")]}]
    sc2 = {(0, 0): Scored(-3.3, False, 1), (0, 1): Scored(-1.05, False, 1)}
    # per char without the space: -1.1 vs -1.05 -> choice 1; with the space: -0.825 vs -0.525 -> choice 1
    assert tasks.mc_metrics(docs2, sc2)["acc_norm"] == 1.0
    sc3 = {(0, 0): Scored(-3.0, False, 1), (0, 1): Scored(-1.2, False, 1)}
    # without the space: -1.0 vs -1.2 -> choice 0 (wrong); with it: -0.75 vs -0.6 -> choice 1
    assert tasks.mc_metrics(docs2, sc3)["acc_norm"] == 0.0


def test_stderr_formula():
    assert tasks.stderr(0.25, 9) == pytest.approx(math.sqrt(0.25 * 0.75 / 8))
    docs = [{"doc_id": i, "label": 0, "requests": [(0, "q", " a"), (1, "q", " b")]} for i in range(4)]
    sc = {}
    for i in range(4):
        sc[(i, 0)] = Scored(-1.0 if i < 3 else -5.0, False, 1)
        sc[(i, 1)] = Scored(-2.0, False, 1)
    m = tasks.mc_metrics(docs, sc)
    assert m["acc"] == 0.75 and m["acc_stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 / 3))


def test_lambada_metrics():
    docs = [{"doc_id": 0, "label": ["x"], "requests": [(0, "c", " word")]},
            {"doc_id": 1, "label": ["y"], "requests": [(0, "c", " more")]}]
    sc = {(0, 0): Scored(-1.0, True, 1), (1, 0): Scored(-3.0, False, 2)}
    m = tasks.lambada_metrics(docs, sc)
    assert m["acc"] == 0.5
    assert m["ppl"] == pytest.approx(math.exp(2.0))
    assert m["bits_per_byte"] == pytest.approx(4.0 / (math.log(2) * 10))


def test_task_files_load_with_limit():
    try:
        tasks.data_root()
    except tasks.TaskError as e:
        pytest.skip(str(e))
    td = tasks.load_task("piqa", limit=5)
    assert len(td.docs) == 5 and td.n_docs_total == 1838
    assert [d["doc_id"] for d in td.docs] == [0, 1, 2, 3, 4]
    for d in td.docs:  # two choices, no unconditional (PMI) requests, label indexes a choice
        assert [i for i, _, _ in d["requests"]] == [0, 1] and d["label"] in (0, 1)
    wg = tasks.load_task("winogrande", limit=3)  # partial scoring: contexts differ, continuation shared
    d = wg.docs[0]
    assert d["requests"][0][1] != d["requests"][1][1] and d["requests"][0][2] == d["requests"][1][2]
    with pytest.raises(tasks.TaskError, match="unknown task"):
        tasks.parse_tasks("hellaswag,nope")
    assert tasks.parse_tasks("quick") == list(tasks.QUICK_TASKS)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "gpt2", "opt"])
def test_scoring_every_architecture(arch):
    import warnings

    from conftest import tiny_model

    m = tiny_model(arch)
    pairs = _pairs(seed=5, docs=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a model that ignores custom masks falls back, which is allowed
        got = loglik.score_tokens(m, pairs, pack=True, row_tokens=128, progress=False)
    for s, (ctx, cont) in zip(got, pairs):
        assert s.logprob == pytest.approx(_reference(m, ctx, cont)[0], abs=2e-4)
