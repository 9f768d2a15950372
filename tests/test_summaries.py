"""A per-direction summary added as a plug-in: registered once, it is batched, merged across
shards, checkpointed, resumed and written into the document with no other change.

Adding a summary touches three files:
1. the module holding its class, a backend.summaries.Summary (update, merge, state_dict / load,
   fields); here, this file's AboveZero;
2. backend/tracking.py, whose SUMMARIES lists it (here the `toy` fixture appends it);
3. its test; here, this file.
The CLI, the pipeline, backend/state.py, backend/output.py and backend/processes.py are
untouched: the run below goes through all of them.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import numpy as np
import pytest
import torch

from backend import tracking
from backend.contexts import BatchTokens
from backend.data import iter_sequences, read_rows
from backend.generate_activations_data import main
from backend.loading import BaseModel, load_model
from backend.summaries import Exporter, Shape, Summary
from tests.reference import lora_a_activations


class AboveZero(Summary):
    """Toy: per direction, the tokens whose activation is above zero, and the sum of squares."""

    name = "above_zero"
    STATE = ("above", "squares")
    interrupt_after: int | None = None  # updates before it sends the run a SIGINT (a test hook)

    def __init__(self, shape: Shape) -> None:
        super().__init__(shape)
        self.above = torch.zeros(shape.num_directions, dtype=torch.long, device=shape.device)
        self.squares = torch.zeros(shape.num_directions, dtype=torch.float64, device=shape.device)

    def update(self, batch: BatchTokens) -> None:
        self.above += (batch.zeroed > 0).sum(1)  # non-finite values are zero in `zeroed`
        self.squares += batch.zeroed.double().square().sum(1)
        if AboveZero.interrupt_after is not None:
            AboveZero.interrupt_after -= 1
            if AboveZero.interrupt_after == 0:
                os.kill(os.getpid(), signal.SIGINT)  # as a user's Ctrl-C: save and stop

    def merge(self, other: AboveZero) -> None:
        self.above += other.above
        self.squares += other.squares

    def fields(self, d: int, doc: Exporter) -> dict[str, Any]:
        return {"above_zero": {"count": int(self.above[d]), "squares": float(self.squares[d])}}


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(tracking, "SUMMARIES", [*tracking.SUMMARIES, AboveZero])
    monkeypatch.setattr(AboveZero, "interrupt_after", None)


def cli(base, adapter, data, out, *extra: str) -> int:
    argv = ["--base-model", str(base), "--lora-path", str(adapter), "--data-file", str(data)]
    return main([*argv, "--max-batch-tokens", "64", "--output", str(out), "--quiet", *extra])


def toy_fields(path) -> dict[tuple[int, str, int], dict]:
    """(layer, module, component) -> the toy's field of that direction."""
    doc = json.loads(path.read_text())
    return {
        (layer["layer"], name, d["component"]): d["above_zero"]
        for layer in doc["layers"]
        for name, projection in layer["projections"].items()
        for d in projection["directions"]
    }


def brute_force(base, adapter, data) -> dict[tuple[int, str, int], np.ndarray]:
    """Every direction's activations at every token, by a separate forward pass per example."""
    model, tokenizer = load_model(BaseModel(str(base), str(base)), str(adapter), torch.float32,
                                  "cpu", None)  # fmt: skip
    sequences = iter_sequences(
        read_rows(data), tokenizer, text_field=None, max_length=None, num_examples=None
    )
    values = lora_a_activations(model, [s.input_ids for s in sequences])
    return {key: np.concatenate(v).astype(np.float64) for key, v in values.items()}


def assert_matches(found: dict, values: np.ndarray) -> None:
    """The toy's result on `values` (another forward pass: equal up to float rounding, so a
    value within rounding of zero may count on either side)."""
    tol = 1e-5 * np.abs(values).max() + 1e-6
    assert (values > tol).sum() <= found["count"] <= (values > -tol).sum()
    assert found["squares"] == pytest.approx(float((values**2).sum()), rel=1e-5)


def test_a_registered_summary_is_batched_merged_resumed_and_written(
    tmp_path, toy, qwen2_base, rank1_adapter, text_file
):
    values = brute_force(qwen2_base, rank1_adapter, text_file)
    run = (qwen2_base, rank1_adapter, text_file)

    assert cli(*run, tmp_path / "many.json") == 0  # batches of at most 64 tokens
    many = toy_fields(tmp_path / "many.json")
    assert set(many) == set(values)
    assert cli(*run, tmp_path / "one.json", "--max-batch-tokens", "100000") == 0  # one batch
    one = toy_fields(tmp_path / "one.json")
    for key, found in many.items():
        assert_matches(found, values[key])
        assert_matches(one[key], values[key])
        assert one[key]["count"] == found["count"]
        assert one[key]["squares"] == pytest.approx(found["squares"], rel=1e-6)

    # Two shards, each a state file with the toy's tensors, merged: the same batches, summed
    # in another order.
    shards = [tmp_path / f"shard{i}.pt" for i in range(2)]
    for i, shard in enumerate(shards):
        assert cli(*run, shard, "--shard", f"{i}/2") == 0
    assert main(["merge", str(tmp_path / "merged.json"), *map(str, shards)]) == 0
    merged = toy_fields(tmp_path / "merged.json")
    for key, found in many.items():
        assert merged[key]["count"] == found["count"]
        assert merged[key]["squares"] == pytest.approx(found["squares"], rel=1e-12)

    # Interrupted after three batches (the checkpoint holds the toy's state), then resumed:
    # exactly the unbroken run.
    checkpoint = tmp_path / "run.ckpt"
    out = tmp_path / "resumed.json"
    AboveZero.interrupt_after = 3
    assert cli(*run, out, "--checkpoint", str(checkpoint)) == 128 + signal.SIGINT
    assert checkpoint.exists() and not out.exists()
    assert cli(*run, out, "--checkpoint", str(checkpoint), "--resume") == 0
    assert toy_fields(out) == many
