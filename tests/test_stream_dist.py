"""Streaming under torchrun (issue 17 item 5): ``dist_read="all"`` (every rank reads its own copy of each
block) and ``"rank0"`` (rank 0 reads, quantkit.stream.RankZeroReader broadcasts) give bit-identical
packed checkpoints, equal to one process's; a read failure on rank 0 stops every rank with its
error; bad values and corrupt shards give one clear error.

The ranks run tests/_stream_dist_worker.py under ``python -m torch.distributed.run`` (2 gloo ranks on CPU).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from _guards import dist_env, free_port, same_checkpoint
from transformers import LlamaConfig, LlamaForCausalLM

import quantkit
from quantkit import stream
from quantkit.cli import build_parser
from quantkit.errors import CheckpointError, QuantkitError

WORKER = os.path.join(os.path.dirname(__file__), "_stream_dist_worker.py")
GPTQ = {"quantizer": {"type": "gptq", "act_order": True, "static_groups": True},
        "format": {"type": "int", "bits": 4, "group_size": 16, "sym": False},
        "calibration": {"batch_size": 2, "accumulate": "float64"}}  # float64: the sums do not depend on the split
RTN = {"quantizer": "rtn", "format": {"type": "int", "bits": 4, "group_size": 16}}  # data-free
RECIPES = {"gptq": GPTQ, "rtn": RTN}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):  # 12 shards: blocks split over several files, lm_head apart
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    d = tmp_path_factory.mktemp("m") / "sharded"
    LlamaForCausalLM(cfg).save_pretrained(d, max_shard_size="20KB")
    return str(d)


def _ids():
    return torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(3))  # as the worker


def torchrun(model_dir, out, dist_read, env=None, check=True):
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
            WORKER, model_dir, str(out), dist_read] + [f"{k}={json.dumps(v)}" for k, v in RECIPES.items()]
    p = subprocess.run(args, capture_output=True, text=True, env=dist_env(**(env or {})), timeout=300)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def by_hand(model_dir, out, dist_read, env):
    """Two ranks started without torchrun, so a failed rank's peer is not killed by the agent before it
    prints its own error. Returns [(returncode, stderr)] by rank."""
    port = str(free_port())
    args = [sys.executable, WORKER, model_dir, str(out), dist_read] + [f"{k}={json.dumps(v)}"
                                                                       for k, v in RECIPES.items()]
    procs = [subprocess.Popen(args, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=dist_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port, **env)) for r in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    return [(p.returncode, e) for p, e in zip(procs, errs)]


def one_process(model_dir, out, name, **kw):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker's ranks
    try:
        return quantkit.quantize(model_dir, RECIPES[name], calibration=_ids(), device="cpu", progress=False,
                                 save_to=str(out), **kw)
    finally:
        torch.set_num_threads(threads)


def test_rank0_all_and_one_process_bit_identical(sharded, tmp_path):
    p = torchrun(sharded, tmp_path / "rank0-", "rank0", env={"QK_PIECE_BYTES": "1000"})  # several pieces a tensor
    meta0 = json.loads(p.stdout.strip().splitlines()[-1])
    p = torchrun(sharded, tmp_path / "all-", "all")
    meta_all = json.loads(p.stdout.strip().splitlines()[-1])
    for name in RECIPES:
        assert meta0[name]["load"] == meta_all[name]["load"] == "stream"
        assert meta0[name]["dist_read"] == "rank0" and meta_all[name]["dist_read"] == "all"
        one_process(sharded, tmp_path / f"one-{name}", name)
        same_checkpoint(tmp_path / f"rank0-{name}", tmp_path / f"all-{name}")
        same_checkpoint(tmp_path / f"rank0-{name}", tmp_path / f"one-{name}")


def test_a_read_failure_on_rank0_stops_every_rank(sharded, tmp_path):
    (rc0, err0), (rc1, err1) = by_hand(sharded, tmp_path / "x-", "rank0", env={"QK_BREAK_READ_BLOCK": "1"})
    assert rc0 == rc1 == 2, (err0[-2000:], err1[-2000:])
    assert "injected corrupt shard" in err0
    # rank 1 names rank 0's failure and the block; nothing is left in place of the output
    assert "rank 0 could not read block 1 for every rank (--dist-read rank0)" in err1, err1[-3000:]
    assert "injected corrupt shard" in err1
    assert not os.path.exists(tmp_path / "x-gptq")


def test_bad_dist_read_value(sharded, tmp_path):
    with pytest.raises(QuantkitError, match=r"dist_read='rank1'.*'all'.*'rank0'.*--dist-read all\|rank0"):
        quantkit.quantize(sharded, RTN, calibration=_ids(), device="cpu", progress=False, dist_read="rank1")
    assert not os.path.exists(tmp_path / "o")
    args = build_parser().parse_args(["quantize", sharded, "-o", "x", "--dist-read", "rank0"])
    assert args.dist_read == "rank0"
    assert build_parser().parse_args(["quantize", sharded, "-o", "x"]).dist_read == "all"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", sharded, "-o", "x", "--dist-read", "some"])


def test_rank0_in_one_process_is_ignored_and_recorded(sharded, tmp_path):
    a = one_process(sharded, tmp_path / "a", "rtn", dist_read="rank0")
    assert a.meta["load"]["dist_read"] == "rank0 (ignored: one process)"
    b = one_process(sharded, tmp_path / "b", "rtn")
    assert "dist_read" not in b.meta["load"]
    same_checkpoint(tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize("indexed", [True, False])
def test_truncated_shard_is_named_before_calibration(sharded, tmp_path, indexed):
    d = tmp_path / "m"
    shutil.copytree(sharded, d)
    shards = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    if not indexed:
        os.remove(d / stream.INDEX_FILE)
    bad = d / shards[len(shards) // 2]  # a block's shard in the middle
    os.truncate(bad, os.path.getsize(bad) - 64)
    want = re.escape(str(bad)) + r": corrupt or truncated safetensors file .*re-download or re-export this shard"
    with pytest.raises(CheckpointError, match=want):
        quantkit.quantize(str(d), RTN, calibration=_ids(), device="cpu", progress=False, save_to=str(tmp_path / "o"))
    assert not os.path.exists(tmp_path / "o")


def test_index_naming_a_tensor_its_shard_lacks(sharded, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(sharded, d)
    idx = json.load(open(d / stream.INDEX_FILE))
    k = "model.layers.2.mlp.up_proj.weight"
    other = next(f for f in sorted(set(idx["weight_map"].values())) if f != idx["weight_map"][k])
    idx["weight_map"][k] = other
    json.dump(idx, open(d / stream.INDEX_FILE, "w"))
    want = re.escape(other) + rf": the index .* places tensor '{k}' in this shard but the shard does not hold it; re-"
    with pytest.raises(CheckpointError, match=want):
        stream.stored_key_files(str(d))
