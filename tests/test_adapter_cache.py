"""The adapter-state cache (backend.adapter_cache): split-invariant order, resume, size, dtype."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from backend import UserError
from backend.adapter_cache import (
    BF16_RELATIVE_ERROR,
    HELD_OUT_FROM,
    CacheReader,
    CacheWriter,
    Tokens,
    cache_bytes,
    check_disk,
    record_bytes,
    remove_cache,
)
from backend.contexts import BatchTokens

EXTRA = 2  # rows past the adapter's directions (baseline neurons): never cached


@dataclass
class Data:
    """Synthetic sequences: example e has lengths[e] tokens, rows x[starts[e]:...]."""

    x: torch.Tensor  # [N, D] float32
    example: torch.Tensor  # [N]
    position: torch.Tensor  # [N]
    ids: torch.Tensor  # [N]
    lengths: list[int]

    def rows(self, e: int) -> slice:
        start = sum(self.lengths[:e])
        return slice(start, start + self.lengths[e])


def make_data(num_examples: int, d: int, seed: int = 0, max_length: int = 40) -> Data:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_length + 1, (num_examples,), generator=g).tolist()
    n = sum(lengths)
    example = torch.repeat_interleave(torch.arange(num_examples), torch.tensor(lengths))
    position = torch.cat([torch.arange(n_) for n_ in lengths])
    # Magnitudes over orders of magnitude, as module types have.
    x = torch.randn(n, d, generator=g) * torch.logspace(-3, 3, d)
    return Data(x, example, position, torch.randint(0, 1000, (n,), generator=g), lengths)


def batch_of(data: Data, examples: list[int]) -> BatchTokens:
    """The examples as one right-padded batch, as the pass gives it (padding full of junk)."""
    d = data.x.shape[1]
    length = max(data.lengths[e] for e in examples)
    acts = torch.full((d + EXTRA, len(examples), length), 7e7)
    ids = torch.zeros(len(examples), length, dtype=torch.long)
    for row, e in enumerate(examples):
        n = data.lengths[e]
        acts[:d, row, :n] = data.x[data.rows(e)].T
        ids[row, :n] = data.ids[data.rows(e)]
    lengths = torch.tensor([data.lengths[e] for e in examples])
    real = (torch.arange(length)[None, :] < lengths[:, None]).flatten().nonzero()[:, 0]
    siblings = torch.full((d + EXTRA, 0), -1, dtype=torch.long)
    example_index = torch.tensor(examples)
    return BatchTokens(acts.flatten(1), real, ids, lengths, example_index, 1, siblings)


def write(writer: CacheWriter, data: Data, examples: list[int], rows: int) -> None:
    for start in range(0, len(examples), rows):
        writer.update(batch_of(data, examples[start : start + rows]))


def read_all(reader: CacheReader, part: str = "all") -> Tokens:
    return Tokens.cat(list(reader.tokens(part)))


def assert_same(a: Tokens, b: Tokens) -> None:
    for name, t in vars(a).items():
        assert torch.equal(t, getattr(b, name)), name


def test_reader_order_does_not_depend_on_writers_or_batches(tmp_path):
    data = make_data(120, 6)
    d = data.x.shape[1]
    one = CacheWriter(tmp_path / "one", "all", d, seed=5)
    write(one, data, list(range(120)), rows=7)
    one.finish()
    split = [CacheWriter(tmp_path / "two", f"shard-{i}-of-2", d, seed=5) for i in range(2)]
    write(split[0], data, list(range(0, 120, 2)), rows=3)
    write(split[1], data, list(range(1, 120, 2))[::-1], rows=11)  # another order, too
    for w in split:
        w.finish()
    whole = CacheReader(tmp_path / "one")
    union = CacheReader(tmp_path / "two", names=["shard-0-of-2", "shard-1-of-2"])
    tight = CacheReader(tmp_path / "two", memory=10 * whole.record)  # every bucket split
    tokens = read_all(whole)
    assert_same(tokens, read_all(union))
    assert_same(tokens, read_all(tight))
    assert not list((tmp_path / "two").glob(".split-*"))  # the split files are gone
    for part in ("train", "heldout"):
        assert_same(read_all(whole, part), read_all(tight, part))
    for a, b in zip(whole.batches(64, "train"), tight.batches(64, "train"), strict=True):
        assert_same(a, b)
    sizes = [len(b) for b in whole.batches(64, "train")]
    assert set(sizes[:-1]) == {64} and 0 < sizes[-1] <= 64
    # The union is exactly the data, in ascending key order, held-out keys last.
    assert whole.num_tokens == len(data.x) == len(tokens)
    assert bool((tokens.key[1:] > tokens.key[:-1]).all())
    order = (tokens.example * 1000 + tokens.position).argsort()
    assert torch.equal(tokens.x[order], data.x)
    assert torch.equal(tokens.ids[order], data.ids)
    assert torch.equal(tokens.position[order], data.position)
    held = read_all(whole, "heldout")
    assert bool((held.key >= HELD_OUT_FROM).all())
    assert 0.02 < len(held) / len(tokens) < 0.09
    assert len(held) + sum(sizes) == len(tokens)


def test_seed_changes_the_order(tmp_path):
    data = make_data(30, 3)
    orders = []
    for seed in (0, 1):
        w = CacheWriter(tmp_path / str(seed), "w", 3, seed=seed)
        write(w, data, list(range(30)), rows=5)
        w.finish()
        t = read_all(CacheReader(tmp_path / str(seed)))
        orders.append(t.example * 1000 + t.position)
    assert not torch.equal(*orders)
    assert torch.equal(orders[0].sort().values, orders[1].sort().values)


def test_resume_drops_what_came_after_the_checkpoint(tmp_path):
    data = make_data(60, 4, seed=1)
    examples = list(range(60))
    unbroken = CacheWriter(tmp_path / "a", "w", 4, seed=2)
    write(unbroken, data, examples, rows=6)
    unbroken.finish()
    broken = CacheWriter(tmp_path / "b", "w", 4, seed=2)
    write(broken, data, examples[:30], rows=6)
    saved = broken.state_dict()
    write(broken, data, examples[30:48], rows=6)  # after the checkpoint: to be dropped
    broken.state_dict()  # flushed to disk, as a crash might leave it
    sizes = [os.path.getsize(p) for p in sorted((tmp_path / "b").glob("*.part"))]
    assert sum(sizes) == sum(data.lengths[:48]) * record_bytes(4)
    resumed = CacheWriter(tmp_path / "b", "w", 4, seed=2, state=saved)
    sizes = [os.path.getsize(p) for p in sorted((tmp_path / "b").glob("*.part"))]
    assert sizes == [c * record_bytes(4) for c in saved["counts"]]
    assert sum(saved["counts"]) == sum(data.lengths[:30])
    write(resumed, data, examples[30:], rows=9)
    resumed.finish()
    assert_same(read_all(CacheReader(tmp_path / "a")), read_all(CacheReader(tmp_path / "b")))
    # A checkpoint taken before a finished writer (the run stopped after the pass) resumes too.
    again = CacheWriter(tmp_path / "b", "w", 4, seed=2, state=saved)
    write(again, data, examples[30:], rows=4)
    again.finish()
    assert_same(read_all(CacheReader(tmp_path / "a")), read_all(CacheReader(tmp_path / "b")))


def test_resume_refuses_a_cache_shorter_than_the_checkpoint(tmp_path):
    data = make_data(20, 3)
    w = CacheWriter(tmp_path, "w", 3, seed=0)
    write(w, data, list(range(20)), rows=5)
    saved = w.state_dict()
    w.finish()
    remove_cache(tmp_path)
    with pytest.raises(UserError, match="rerun without --resume") as e:
        CacheWriter(tmp_path, "w", 3, seed=0, state=saved)
    assert "\n" not in str(e.value)


def test_bfloat16_round_trip_within_its_bound(tmp_path):
    data = make_data(40, 5, seed=3)
    for dtype in ("float32", "bfloat16"):
        w = CacheWriter(tmp_path / dtype, "w", 5, seed=0, dtype=dtype)
        write(w, data, list(range(40)), rows=8)
        w.finish()
        files = (tmp_path / dtype).glob("*.bin")
        assert sum(os.path.getsize(p) for p in files) == cache_bytes(len(data.x), 5, dtype)
    exact = read_all(CacheReader(tmp_path / "float32"))
    rounded = read_all(CacheReader(tmp_path / "bfloat16"))
    assert torch.equal(exact.key, rounded.key) and torch.equal(exact.ids, rounded.ids)
    error = (rounded.x - exact.x).abs()
    assert bool((error <= BF16_RELATIVE_ERROR * exact.x.abs()).all())
    assert float((error / exact.x.abs()).max()) > BF16_RELATIVE_ERROR / 4  # really rounded


def test_size_and_disk_check(tmp_path):
    assert cache_bytes(10_000_000, 448) == 10_000_000 * (448 * 4 + 16)  # ~18 GB, as the issue
    assert cache_bytes(10, 448, "bfloat16") == 10 * (448 * 2 + 16)
    assert check_disk(tmp_path / "not" / "yet", 1000, 8) >= cache_bytes(1000, 8)
    with pytest.raises(UserError, match=r"the SAE cache needs .* only .* free") as e:
        check_disk(tmp_path / "cache", 10**15, 448)
    assert "\n" not in str(e.value)


def test_reader_refuses_other_runs_and_missing_writers(tmp_path):
    data = make_data(10, 3)
    w = CacheWriter(tmp_path, "shard-0-of-2", 3, seed=0, run="run-a")
    write(w, data, list(range(10)), rows=5)
    w.finish()
    with pytest.raises(UserError, match="cache of another run"):
        CacheReader(tmp_path, run="run-b")
    with pytest.raises(UserError, match=r"shard-1-of-2\.cache\.json: missing"):
        CacheReader(tmp_path, names=["shard-0-of-2", "shard-1-of-2"])
    unfinished = CacheWriter(tmp_path, "shard-1-of-2", 3, seed=0, run="run-a")
    write(unfinished, data, list(range(3)), rows=5)
    assert CacheReader(tmp_path).names == ["shard-0-of-2"]  # an unfinished writer: not read
    remove_cache(tmp_path, ["shard-1-of-2"])
    assert {p.name.split(".")[0] for p in tmp_path.iterdir()} == {"shard-0-of-2"}
    remove_cache(tmp_path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="no finished SAE cache"):
        CacheReader(tmp_path)
    with pytest.raises(UserError, match="cache dtype"):
        CacheWriter(tmp_path, "w", 3, seed=0, dtype="float16")
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(UserError, match="cannot write the SAE cache") as e:
        CacheWriter(tmp_path / "file" / "cache", "w", 3, seed=0)
    assert "\n" not in str(e.value)


def fed(writer: CacheWriter, data: Data, batches: list[list[int]], log: list[list[int]]) -> None:
    """Each batch (examples) fed to the writer, and noted in `log` as the pass gave it."""
    for examples in batches:
        writer.update(batch_of(data, examples))
        log.append(examples)


def test_replay_gives_back_each_writers_batches_as_fed(tmp_path):
    data = make_data(70, 5, seed=4)
    d = data.x.shape[1]
    order = torch.randperm(70, generator=torch.Generator().manual_seed(0)).tolist()
    batches = [order[i : i + 6] for i in range(0, 70, 6)]  # examples in no order within
    first, second = CacheWriter(tmp_path, "a", d, seed=3), CacheWriter(tmp_path, "b", d, seed=3)
    expected: dict[str, list[list[int]]] = {"a": [], "b": []}
    fed(first, data, batches[:3], expected["a"])
    saved = first.state_dict()
    first.update(batch_of(data, batches[3]))  # after the checkpoint: dropped on resume
    first = CacheWriter(tmp_path, "a", d, seed=3, state=saved)
    fed(first, data, batches[3:7], expected["a"])
    fed(second, data, batches[7:], expected["b"])
    for w in (second, first):
        w.finish()
    reader = CacheReader(tmp_path, names=["a", "b"])
    replayed = list(reader.replay())
    wanted = expected["a"] + expected["b"]
    assert len(replayed) == len(wanted)
    for got, examples in zip(replayed, wanted, strict=True):
        examples = sorted(examples)
        lengths = [data.lengths[e] for e in examples]
        assert got.example_index.tolist() == examples
        assert got.lengths.tolist() == lengths
        assert got.input_ids.shape == (len(examples), max(lengths))
        rows = torch.cat([torch.arange(data.rows(e).start, data.rows(e).stop) for e in examples])
        assert torch.equal(got.x, data.x[rows])  # exact: float32 round trip
        for row, e in enumerate(examples):
            assert got.input_ids[row, : lengths[row]].tolist() == data.ids[data.rows(e)].tolist()
        # real: the flat positions of the tokens, row by row, in position order
        starts = [row * max(lengths) for row in range(len(examples))]
        assert got.real.tolist() == [
            s + t for s, n in zip(starts, lengths, strict=True) for t in range(n)
        ]
    # The replay's tokens are the cache's, the dropped batch aside.
    assert sum(len(b.x) for b in replayed) == reader.num_tokens


def test_replay_refuses_a_damaged_log(tmp_path):
    data = make_data(12, 3)
    w = CacheWriter(tmp_path, "w", 3, seed=0)
    write(w, data, list(range(12)), rows=4)
    w.finish()
    log = tmp_path / "w.batches.i32"
    log.write_bytes(log.read_bytes()[:-4])
    with pytest.raises(UserError, match="a damaged cache") as e:
        list(CacheReader(tmp_path).replay())
    assert "\n" not in str(e.value)
