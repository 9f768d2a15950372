"""A batch that runs out of GPU memory is retried in halves with the same result."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch

from backend.generate_activations_data import main
from tests.test_scale import assert_same


@pytest.fixture
def cli(tmp_path, qwen2_base, rank1_adapter, text_file) -> Callable[..., list[str]]:
    """argv of a good run writing into tmp_path/out; later options override earlier ones."""

    def argv(*extra: str) -> list[str]:
        return ["--base-model", str(qwen2_base), "--lora-path", str(rank1_adapter),
                "--data-file", str(text_file), "--output", str(tmp_path / "out" / "o.json"),
                "--top-k", "4", "--context-window", "2", "--quiet", *extra]  # fmt: skip

    return argv


def warnings(capsys) -> list[str]:
    """The warning lines on stderr (loading libraries may add progress bars there)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]


# ---- out of GPU memory ---------------------------------------------------------------------


@contextmanager
def out_of_memory_above(tokens: int) -> Iterator[list[int]]:
    """Every model forward over more than `tokens` (padded) input ids raises a real
    torch.OutOfMemoryError, as CUDA's allocator would; yields the sizes that failed."""
    failed: list[int] = []

    def hook(module, args):
        if isinstance(module, torch.nn.Embedding) and args[0].numel() > tokens:
            failed.append(args[0].numel())
            raise torch.OutOfMemoryError(f"CUDA out of memory: {args[0].numel()} tokens (injected)")

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield failed
    finally:
        handle.remove()


def test_out_of_memory_batches_are_split_with_the_same_result(tmp_path, capsys, cli):
    out = tmp_path / "out" / "o.json"
    assert main(cli("--max-batch-tokens", "256")) == 0
    unbroken = json.loads(out.read_text())
    with out_of_memory_above(150) as failed:  # above one sequence, below some batches
        assert main(cli("--max-batch-tokens", "256")) == 0
    assert failed, "no batch was large enough to fail"
    (warning,) = warnings(capsys)
    assert warning.startswith("warning: out of GPU memory on a batch of ")
    assert warning.endswith(" tokens: retrying it in smaller batches")
    # Smaller batches pad less, and CPU kernels round differently for other shapes.
    assert_same(json.loads(out.read_text()), unbroken, exact=False, rel=1e-6)


def test_one_sequence_out_of_memory_suggests_max_length(tmp_path, capsys, cli):
    with out_of_memory_above(20):
        code = main(cli("--max-batch-tokens", "256"))
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "out of GPU memory on one sequence of" in err.splitlines()[-1]
    assert err.splitlines()[-1].endswith("cut sequences with --max-length")
    assert not (tmp_path / "out" / "o.json").exists()
