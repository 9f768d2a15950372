"""Processes, shards and resume give the result of one unbroken run (tiny real model, CPU), for
the directions and the baseline neurons alike."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backend.contract import iter_directions, iter_examples
from backend.generate_activations_data import main
from tests.runs import SCRIPT, assert_same, assert_same_sae, subprocess_env, tie_heavy_rows
from tests.tiny import random_texts


@pytest.fixture(scope="module")
def many_texts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "many.jsonl"
    rows = tie_heavy_rows(random_texts(40, seed=5))
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


NEURONS = 4  # baseline neurons per layer: every split below must give theirs exactly too
BELOW = 4  # below-median contexts, from the reservoir: every split must sample the same
SAE = ["--sae", "--sae-latents", "24", "--sae-k", "3"]  # and train the same SAE


def args(base, adapter, data, out, *extra) -> list[str]:
    return ["--base-model", str(base), "--lora-path", str(adapter), "--data-file", str(data),
            "--num-examples", "all", "--top-k", "6", "--context-window", "2",
            "--max-batch-tokens", "96", "--baseline-neurons", str(NEURONS), "--output", str(out),
            "--below-median-contexts", str(BELOW), *SAE,
            "--quiet", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def unbroken_run(tmp_path_factory, qwen2_base, rank1_adapter, many_texts) -> Path:
    out = tmp_path_factory.mktemp("unbroken") / "out.json"
    assert main(args(qwen2_base, rank1_adapter, many_texts, out)) == 0
    assert not (out.parent / "sae-cache").exists()  # the cache is gone once the SAE is read
    return out


@pytest.fixture(scope="module")
def unbroken(unbroken_run) -> dict:
    doc = json.loads(unbroken_run.read_text())
    counts = [e["occurrences"] for d in iter_directions(doc) for e in iter_examples(d.direction)]
    assert min(counts) >= 3 and max(counts) >= 120  # each row thrice; the prefix in all 120
    assert len(doc["baseline_neurons"]) == NEURONS * len(doc["layers"])
    lowest = [
        r for d in iter_directions(doc) for r in d.direction["quantile_samples"] if r["cut"] == 0
    ]
    assert max(len(r["examples"]) for r in lowest) == BELOW  # more than the range's own 2
    return doc


def test_two_processes_equal_one(tmp_path, qwen2_base, rank1_adapter, many_texts, unbroken,
                                 unbroken_run):  # fmt: skip
    out = tmp_path / "out.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", "29533", SCRIPT, *args(qwen2_base, rank1_adapter, many_texts, out),
               "--device", "cpu"]  # fmt: skip
    env = subprocess_env()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["metadata"]["num_processes"] == 2
    assert_same(doc, unbroken, exact=False)
    assert_same_sae(out, unbroken_run)
    assert not list(tmp_path.glob("*.ckpt*"))  # checkpoints are removed once the output exists


def test_shards_merged_equal_one_run(tmp_path, qwen2_base, rank1_adapter, many_texts, unbroken,
                                     unbroken_run):  # fmt: skip
    shards = [tmp_path / f"shard{i}.pt" for i in range(3)]
    for i, shard in enumerate(shards):
        assert main(args(qwen2_base, rank1_adapter, many_texts, shard, "--shard", f"{i}/3")) == 0
    out = tmp_path / "merged.json"
    assert main(["merge", str(out), *map(str, reversed(shards))]) == 0
    doc = json.loads(out.read_text())
    assert doc["metadata"]["num_processes"] == 3
    assert_same(doc, unbroken, exact=False)
    assert_same_sae(out, unbroken_run)
    assert not (tmp_path / "sae-cache").exists()  # merge read the shards' caches, then removed


def test_merge_refuses_incomplete_or_mixed_shards(tmp_path, capsys, qwen2_base, rank1_adapter,
                                                  many_texts):  # fmt: skip
    shard0 = tmp_path / "s0.pt"
    assert main(args(qwen2_base, rank1_adapter, many_texts, shard0, "--shard", "0/2")) == 0
    assert main(["merge", str(tmp_path / "o.json"), str(shard0)]) == 1
    assert "need shards 0..1 of 2" in capsys.readouterr().err
    other = tmp_path / "s1.pt"
    extra = ("--shard", "1/2", "--top-k", "3")
    assert main(args(qwen2_base, rank1_adapter, many_texts, other, *extra)) == 0
    assert main(["merge", str(tmp_path / "o.json"), str(shard0), str(other)]) == 1
    assert "top_k" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "o.json"), str(many_texts)]) == 1
    assert "not a state file" in capsys.readouterr().err
    # merge counts the shown windows over the run's data: gone, it says so in one line
    data = tmp_path / "moved.jsonl"
    data.write_bytes(many_texts.read_bytes())
    shards = [tmp_path / f"m{i}.pt" for i in range(2)]
    for i, shard in enumerate(shards):
        assert main(args(qwen2_base, rank1_adapter, data, shard, "--shard", f"{i}/2")) == 0
    data.unlink()
    assert main(["merge", str(tmp_path / "o.json"), *map(str, shards)]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: merge counts the shown windows over the run's data, and {data} is not there"
    )
    assert not (tmp_path / "o.json").exists()


def run_until_checkpoint(command: list[str], checkpoint: Path) -> subprocess.Popen:
    """Start a run and return it once it has saved a checkpoint and is still going."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env()
    )
    deadline = time.monotonic() + 120
    while not checkpoint.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.2)  # a few more batches, and likely a checkpoint being rewritten
    assert process.poll() is None, "the run ended before it could be interrupted"
    return process


@pytest.fixture(scope="module")
def long_run(tmp_path_factory, qwen2_base, rank1_adapter) -> tuple[Path, dict, Path]:
    """A data file long enough to interrupt a run of it, and its unbroken result."""
    folder = tmp_path_factory.mktemp("long")
    data = folder / "long.jsonl"
    rows = tie_heavy_rows(random_texts(667, seed=8))
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = folder / "out.json"
    assert main(args(qwen2_base, rank1_adapter, data, out, "--max-batch-tokens", "48")) == 0
    return data, json.loads(out.read_text()), out


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_killed_run_resumes_to_the_same_result(tmp_path, qwen2_base, rank1_adapter, long_run,
                                               sig):  # fmt: skip
    data, unbroken, unbroken_out = long_run
    out = tmp_path / "out.json"
    checkpoint = tmp_path / "run.ckpt"
    run = args(qwen2_base, rank1_adapter, data, out, "--max-batch-tokens", "48",
               "--checkpoint", str(checkpoint))  # fmt: skip
    every_batch = [*run, "--checkpoint-every", "1"]
    process = run_until_checkpoint([sys.executable, SCRIPT, *every_batch], checkpoint)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    if sig != signal.SIGKILL:  # saved, said so in one line, and stopped
        assert process.returncode == 128 + sig, stderr[-2000:]
        assert stderr.splitlines()[-1] == (
            f"interrupted by {sig.name}; state saved to {checkpoint}: rerun with --resume"
        )
        assert "Traceback" not in stderr
    assert not out.exists() and checkpoint.exists()
    assert main([*run, "--resume"]) == 0
    assert_same(json.loads(out.read_text()), unbroken, exact=True)
    assert_same_sae(out, unbroken_out)  # the cache cut back to the checkpoint, written again
    assert not checkpoint.exists()
