"""Shared fixtures: tiny random models of each supported architecture family (no hub)."""

from __future__ import annotations

import os

# Triton kernels are tested on CPU through Triton's interpreter. The flag must be set before anything
# imports triton (its standard library is decorated at import time), so it is set here, first.
# QUANTKIT_TEST_CUDA=1 runs the kernel tests on a real GPU instead.
if os.environ.get("QUANTKIT_TEST_CUDA") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_config(arch: str):
    import transformers as tf

    common = dict(vocab_size=256, num_hidden_layers=2)
    if arch == "llama":
        return tf.LlamaConfig(hidden_size=64, intermediate_size=160, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=256, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(hidden_size=64, intermediate_size=160, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=256, **common)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(hidden_size=64, intermediate_size=160, num_attention_heads=4,
                                   num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                                   sliding_window=16, **common)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, vocab_size=256)
    if arch == "opt":
        return tf.OPTConfig(hidden_size=64, ffn_dim=160, num_attention_heads=4, max_position_embeddings=256,
                            word_embed_proj_dim=64, **common)
    raise ValueError(arch)


ARCHS = ["llama", "qwen2", "gemma3", "gpt2", "opt"]


def tiny_model(arch: str = "llama", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(tiny_config(arch))
    return m.eval()


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture
def calib_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (8, 32), generator=g)
