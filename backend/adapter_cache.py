"""The cache of the adapter state: per real token, the D-vector of direction activations.

The pass (`--sae`) writes it; the SAE (backend.sae) trains on it and sweeps it afterwards.

Every token gets a seeded key from (example index, position) alone (`seeded_keys`), and the
cache is read in key order: a pseudo-random order of the tokens that does not depend on how they
were split into batches, processes or shards, so neither does anything trained or measured
on it. The last 5% of key space is held out (HELD_OUT_FROM).

Each writer (a process, a `--shard` job) has a name and its own files: one per key-range bucket
(the top BUCKET_BITS bits of the key), to which each batch appends its tokens as fixed-size
records. The reader takes the union of the finished writers and yields one bucket at a time,
sorted by key. A bucket larger than the reader's memory budget is first partitioned by the next
bits of the key into temporary files (once more, recursively, where one of those is still too
large), so reading needs memory bounded by the budget whatever the size of the data; a split
costs one more read and write of that bucket's tokens.

A record: example index (int64), position (int32), token id (int32), then the D activations
(float32, or bfloat16: relative error at most BF16_RELATIVE_ERROR), in the machine's byte order.

Each writer also logs, per batch it is fed, how many of its tokens went to each bucket (its
`.batches.i32` file once finished): `CacheReader.replay` reads the batches back as the pass saw
them, whole sequences, for sweeps whose summaries need them (context windows, positions).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from backend import UserError
from backend.atomic import write_atomic
from backend.contexts import BatchTokens, token_keys

FORMAT = "lora-adapter-cache"
VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# bfloat16 keeps 8 significant bits and rounds to nearest: |stored - x| <= 2**-8 |x| for a
# normal x (|x| within float32's normal range, which bfloat16 shares).
BF16_RELATIVE_ERROR = 2.0**-8
KEY_BITS = 62  # keys lie in [0, 2**62)
BUCKET_BITS = 6  # 64 bucket files per writer; a split partitions by 6 more bits
HELD_OUT = 0.05
HELD_OUT_FROM = 2**KEY_BITS - (2**KEY_BITS // 20)  # keys from here on: the held-out 5%
META_BYTES = 16  # example int64, position int32, token id int32
MEMORY = 256 * 2**20  # default bytes of records a reader loads at once
PARTS = ("all", "train", "heldout")
_MIX = ((0xBF58476D1CE4E5B9 - 2**64, 30), (0x94D049BB133111EB - 2**64, 27))


def seeded_keys(example: torch.Tensor, position: torch.Tensor, seed: int) -> torch.Tensor:
    """[N] int64 in [0, 2**62): a pseudo-random key of each token, from its example index,
    position and the seed only (token_keys, mixed with the seed)."""
    word = (seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**64
    h = token_keys(example, position) ^ (word - 2**64 if word >= 2**63 else word)
    for multiplier, shift in _MIX:  # int64 multiplications wrap around
        h = h ^ ((h >> shift) & ((1 << (64 - shift)) - 1))  # a logical shift right
        h = h * multiplier
    return h & (2**KEY_BITS - 1)


def record_bytes(num_directions: int, dtype: str = "float32") -> int:
    return META_BYTES + num_directions * DTYPES[dtype].itemsize


def cache_bytes(num_tokens: int, num_directions: int, dtype: str = "float32") -> int:
    """The cache's size on disk: tokens x (D x itemsize + the 16 bytes of ints)."""
    return num_tokens * record_bytes(num_directions, dtype)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def check_disk(folder: Path, num_tokens: int, num_directions: int, dtype: str = "float32") -> int:
    """Refuse, in one line, a cache that the disk under `folder` lacks room for; returns its
    bytes. The room asked for includes one bucket more, which a reader's split may need."""
    need = cache_bytes(num_tokens, num_directions, dtype)
    need += need >> BUCKET_BITS
    existing = Path(folder)
    while not existing.exists():  # the folder is made later: ask its first existing parent
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < need:
        raise UserError(
            f"{folder}: the SAE cache needs {_size(need)} for {num_tokens:,} tokens x "
            f"{num_directions} directions ({dtype}), only {_size(free)} free: free some, choose "
            "another --cache-dir, or use --cache-dtype bfloat16"
        )
    return need


@contextmanager
def disk_errors(folder: Path) -> Iterator[None]:
    """A failing write (a full disk, a quota, permissions) as one line."""
    try:
        yield
    except OSError as e:
        raise UserError(f"{folder}: cannot write the SAE cache ({e.strerror or e})") from None


def _bucket_path(folder: Path, name: str, bucket: int, suffix: str) -> Path:
    return folder / f"{name}.b{bucket:02d}.{suffix}"


def _manifest_path(folder: Path, name: str) -> Path:
    return folder / f"{name}.cache.json"


def _log_path(folder: Path, name: str) -> Path:
    return folder / f"{name}.batches.i32"


def encode_records(
    x: torch.Tensor,  # [N, D], on any device
    example: torch.Tensor,  # [N]
    position: torch.Tensor,  # [N]
    ids: torch.Tensor,  # [N]
    dtype: str,
) -> torch.Tensor:
    """[N, record_bytes] uint8 on the CPU: the tokens as the cache stores them."""
    records = torch.empty(len(x), record_bytes(x.shape[1], dtype), dtype=torch.uint8)
    # The ints as bytes: a record's size need not be a multiple of theirs.
    for t, kind, at in (
        (example, torch.int64, 0),
        (position, torch.int32, 8),
        (ids, torch.int32, 12),
    ):
        records[:, at : at + kind.itemsize] = t.to("cpu", kind)[:, None].view(torch.uint8)
    records[:, META_BYTES:].view(DTYPES[dtype]).copy_(x)  # one copy (to the host, rounded)
    return records


def append_by_bucket(files: list, records: torch.Tensor, counts: list[int]) -> None:
    """Append records [N, record] uint8, sorted by bucket, `counts` [buckets] of each, to
    each bucket's file."""
    rows, start = records.numpy(), 0
    for f, count in zip(files, counts, strict=True):
        if count:
            f.write(memoryview(rows[start : start + count]))
            start += count


@dataclass
class Tokens:
    """Tokens of the cache, in key order."""

    x: torch.Tensor  # [n, D] float32
    example: torch.Tensor  # [n] int64
    position: torch.Tensor  # [n] int64
    ids: torch.Tensor  # [n] int64
    key: torch.Tensor  # [n] int64, ascending

    def __len__(self) -> int:
        return len(self.key)

    def select(self, index: torch.Tensor | slice) -> Tokens:
        return Tokens(*(t[index] for t in vars(self).values()))

    @staticmethod
    def cat(parts: list[Tokens]) -> Tokens:
        fields = [vars(p).values() for p in parts]
        return Tokens(*(torch.cat(ts) for ts in zip(*fields, strict=True)))


def unpack_records(
    records: torch.Tensor, num_directions: int, dtype: str
) -> tuple[torch.Tensor, ...]:
    """x [n, D] float32, example, position, ids [n] int64 of records [n, record_bytes] uint8."""
    example = records[:, :8].contiguous().view(torch.int64)[:, 0]
    position = records[:, 8:12].contiguous().view(torch.int32)[:, 0].long()
    ids = records[:, 12:16].contiguous().view(torch.int32)[:, 0].long()
    x = records[:, META_BYTES:].contiguous().view(DTYPES[dtype]).float().view(-1, num_directions)
    return x, example, position, ids


def decode_records(records: torch.Tensor, num_directions: int, dtype: str, seed: int) -> Tokens:
    """Tokens of records [n, record_bytes] uint8, sorted by key (ties, which only a repeated
    (example, position) could make, by example and position)."""
    x, example, position, ids = unpack_records(records, num_directions, dtype)
    key = seeded_keys(example, position, seed)
    order = position.argsort(stable=True)
    order = order[example[order].argsort(stable=True)]
    order = order[key[order].argsort(stable=True)]
    return Tokens(x, example, position, ids, key).select(order)


class CacheWriter:
    """One writer's files in `folder`, fed a batch at a time, like a summary.

    `state`: the writer's `state_dict` from a checkpoint, to resume: each file is cut back to
    what that checkpoint had written, so tokens written after it are dropped (and the resumed
    pass writes them again). Without one, any files of this name are started afresh.
    `run`: the run's identity (any string), checked by the reader.
    """

    def __init__(
        self,
        folder: Path,
        name: str,
        num_directions: int,
        seed: int,
        dtype: str = "float32",
        run: str = "",
        state: dict[str, Any] | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise UserError(f"cache dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        if not name or "/" in name or name.startswith("."):
            raise UserError(f"cache writer name {name!r}: a plain file name is needed")
        self.folder, self.name = Path(folder), name
        self.num_directions, self.seed, self.dtype, self.run = num_directions, seed, dtype, run
        self.record = record_bytes(num_directions, dtype)
        self.counts = [0] * 2**BUCKET_BITS  # tokens written per bucket
        self.log: list[list[int]] = []  # per batch fed, its tokens per bucket
        with disk_errors(self.folder):
            self.folder.mkdir(parents=True, exist_ok=True)
            if state is not None:
                self._restore(state)
            mode = "r+b" if state is not None else "wb"
            self.files = [open(self._path(b, "part"), mode) for b in range(len(self.counts))]  # noqa: SIM115
            for f in self.files:
                f.seek(0, os.SEEK_END)
            if state is None:
                _manifest_path(self.folder, name).unlink(missing_ok=True)

    def _path(self, bucket: int, suffix: str) -> Path:
        return _bucket_path(self.folder, self.name, bucket, suffix)

    def _restore(self, state: dict[str, Any]) -> None:
        """Cut each file back to the tokens `state` counts (a finished writer's files, renamed
        on finish, are taken back first)."""
        if state["name"] != self.name or len(state["counts"]) != len(self.counts):
            raise UserError(f"the checkpoint's SAE cache is {state['name']!r}, not {self.name!r}")
        log = state["batches"].view(-1, len(self.counts))
        if log.long().sum(0).tolist() != state["counts"]:
            raise ValueError("a checkpoint whose batch log does not add up to its counts")
        manifest = _manifest_path(self.folder, self.name)
        if manifest.exists():
            for b in range(len(self.counts)):
                os.replace(self._path(b, "bin"), self._path(b, "part"))
            manifest.unlink()
            _log_path(self.folder, self.name).unlink(missing_ok=True)
        for b, count in enumerate(state["counts"]):
            path = self._path(b, "part")
            size = path.stat().st_size if path.exists() else -1
            if size < count * self.record:
                raise UserError(
                    f"{path}: the SAE cache lacks tokens the checkpoint wrote (was "
                    "--cache-dir changed?): rerun without --resume"
                )
            os.truncate(path, count * self.record)
        self.counts, self.log = list(state["counts"]), log.tolist()

    @property
    def num_tokens(self) -> int:
        return sum(self.counts)

    def update(self, batch: BatchTokens) -> None:
        """The batch's real tokens, in the first num_directions directions (the adapter's)."""
        x = batch.x[: self.num_directions].T  # [N, D]
        self.write(x, batch.example, batch.position, batch.ids)

    def write(
        self, x: torch.Tensor, example: torch.Tensor, position: torch.Tensor, ids: torch.Tensor
    ) -> None:
        """Append tokens: x [N, D] (any device), example, position, ids [N]; one batch of the
        log (for `CacheReader.replay`, whole sequences, positions from 0)."""
        if x.shape[1] != self.num_directions:
            raise ValueError(f"{x.shape[1]} directions, the cache has {self.num_directions}")
        example, position = example.cpu().long(), position.cpu().long()
        bucket = seeded_keys(example, position, self.seed) >> (KEY_BITS - BUCKET_BITS)
        order = bucket.argsort()
        # Gathered in bucket order where x is (on a GPU: before it crosses to the host).
        x = x.index_select(0, order.to(x.device))
        records = encode_records(x, example[order], position[order], ids.cpu()[order], self.dtype)
        counts = torch.bincount(bucket, minlength=len(self.counts)).tolist()
        with disk_errors(self.folder):
            append_by_bucket(self.files, records, counts)
        self.counts = [a + b for a, b in zip(self.counts, counts, strict=True)]
        self.log.append(counts)

    def _flush(self) -> None:
        with disk_errors(self.folder):
            for f in self.files:
                f.flush()
                os.fsync(f.fileno())

    def state_dict(self) -> dict[str, Any]:
        """Where the writer stands, for a checkpoint: its files are flushed to disk first.
        batches: [batches, buckets] int32, the log (a few hundred bytes per batch)."""
        self._flush()
        return {"name": self.name, "counts": list(self.counts), "batches": self._log()}

    def _log(self) -> torch.Tensor:
        return torch.tensor(self.log, dtype=torch.int32).view(-1, len(self.counts))

    def finish(self) -> None:
        """Close the files, rename them finished and write the manifest that readers look for."""
        self._flush()
        with disk_errors(self.folder):
            for b, f in enumerate(self.files):
                f.close()
                os.replace(self._path(b, "part"), self._path(b, "bin"))
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "run": self.run,
            "num_directions": self.num_directions,
            "dtype": self.dtype,
            "seed": self.seed,
            "bucket_bits": BUCKET_BITS,
            "counts": self.counts,
            "batches": len(self.log),
        }
        log = self._log().numpy().tobytes()
        write_atomic(_log_path(self.folder, self.name), lambda f: f.write(log))
        data = json.dumps(manifest).encode()
        write_atomic(_manifest_path(self.folder, self.name), lambda f: f.write(data))


@dataclass
class Replayed:
    """One batch as the pass fed it to a writer: whole sequences, right-padded, which a
    BatchTokens (or Tracker.update) takes with activations [., B*L] scattered at `real`."""

    x: torch.Tensor  # [N, D] float32, the real tokens in (example, position) order
    real: torch.Tensor  # [N] their flat positions in [B, L]
    input_ids: torch.Tensor  # [B, L], 0 at padding
    lengths: torch.Tensor  # [B]
    example_index: torch.Tensor  # [B], ascending


def sequences(
    x: torch.Tensor, example: torch.Tensor, position: torch.Tensor, ids: torch.Tensor
) -> Replayed:
    """A batch's tokens (x [N, D], example, position, ids [N], in any order) as whole sequences;
    refuses tokens that are not each sequence's positions 0 .. length-1."""
    order = position.argsort(stable=True)
    order = order[example[order].argsort(stable=True)]
    x, example, position, ids = x[order], example[order], position[order], ids[order]
    example_index, lengths = torch.unique_consecutive(example, return_counts=True)
    row = torch.repeat_interleave(torch.arange(len(lengths)), lengths)  # [N]
    first = lengths.cumsum(0) - lengths  # [B] each sequence's first token
    if not torch.equal(position, torch.arange(len(x)) - first[row]):
        raise ValueError("a batch of the cache does not hold whole sequences from position 0")
    real = row * int(lengths.max()) + position
    input_ids = torch.zeros(len(lengths), int(lengths.max()), dtype=torch.long)
    input_ids.view(-1)[real] = ids
    return Replayed(x, real, input_ids, lengths, example_index)


@dataclass
class _Piece:
    path: Path
    count: int  # records


class CacheReader:
    """The union of the finished writers in `folder`, in key order.

    names: the writers that must be there (e.g. every shard's), or None for all found;
    run: the identity the writers must have been given. memory: bytes of records loaded at
    once (peak RAM is about three times it: the records, their float32 values, a sorted copy).
    """

    def __init__(
        self,
        folder: Path,
        names: list[str] | None = None,
        run: str | None = None,
        memory: int = MEMORY,
    ) -> None:
        self.folder, self.memory = Path(folder), memory
        found = sorted(p.name.removesuffix(".cache.json") for p in self.folder.glob("*.cache.json"))
        names = found if names is None else names
        if not names:
            raise UserError(f"{folder}: no finished SAE cache there")
        manifests = {n: self._manifest(n) for n in names}
        first = manifests[names[0]]
        for name, m in manifests.items():
            if run is not None and m["run"] != run:
                raise UserError(
                    f"{_manifest_path(self.folder, name)}: a cache of another run: remove it "
                    "or choose another --cache-dir"
                )
            fields = ("num_directions", "dtype", "seed", "bucket_bits", "run")
            if any(m[f] != first[f] for f in fields):
                raise UserError(f"{folder}: caches {names[0]} and {name} differ in their options")
        self.names, self.manifests = names, manifests
        self.num_directions, self.dtype = first["num_directions"], first["dtype"]
        self.seed, self.bits = first["seed"], first["bucket_bits"]
        self.record = record_bytes(self.num_directions, self.dtype)
        self.buckets = [  # per bucket, its file of each writer
            [
                _Piece(_bucket_path(self.folder, n, b, "bin"), manifests[n]["counts"][b])
                for n in names
            ]
            for b in range(2**self.bits)
        ]
        self.num_tokens = sum(p.count for pieces in self.buckets for p in pieces)

    def _manifest(self, name: str) -> dict[str, Any]:
        path = _manifest_path(self.folder, name)
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(
                f"{path}: missing (that writer's cache is unfinished or gone)"
            ) from None
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: not a cache manifest ({type(e).__name__})") from None
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise UserError(f"{path}: not a cache manifest of this version")
        return manifest

    def replay(self) -> Iterator[Replayed]:
        """Each writer's batches (writers in `names` order), as the pass fed them: each batch
        takes from each bucket file its next count of the log (every file read sequentially,
        all open at once). Memory: one batch."""
        for w, name in enumerate(self.names):
            log = self._log(name)  # [batches, buckets]
            with disk_errors(self.folder), ExitStack() as stack:
                files = [stack.enter_context(open(p[w].path, "rb")) for p in self.buckets]
                for counts in log.tolist():
                    data = bytearray().join(
                        self._take(f, n) for f, n in zip(files, counts, strict=True) if n
                    )
                    records = torch.frombuffer(data, dtype=torch.uint8).view(-1, self.record)
                    yield sequences(*unpack_records(records, self.num_directions, self.dtype))

    def batch_sizes(self) -> torch.Tensor:
        """[batches] int64: the tokens of each batch `replay` yields, in its order."""
        return torch.cat([self._log(name).long().sum(1) for name in self.names])

    def _log(self, name: str) -> torch.Tensor:
        """[batches, buckets] int32: a writer's log of its tokens per bucket per batch."""
        path, buckets = _log_path(self.folder, name), len(self.buckets)
        data = bytearray(path.read_bytes()) if path.exists() else bytearray()
        log = (
            torch.frombuffer(data, dtype=torch.int32) if data else torch.zeros(0, dtype=torch.int32)
        )
        batches = self.manifests[name]["batches"]
        counts = self.manifests[name]["counts"]
        if (
            log.numel() != batches * buckets
            or log.view(-1, buckets).long().sum(0).tolist() != counts
        ):
            raise UserError(f"{path}: missing or not the log its manifest counts (a damaged cache)")
        return log.view(-1, buckets)

    def _take(self, f: Any, count: int) -> bytes:
        data = f.read(count * self.record)
        if len(data) != count * self.record:
            raise UserError(f"{f.name}: shorter than its manifest says (a damaged cache)")
        return data

    def tokens(self, part: str = "all") -> Iterator[Tokens]:
        """The tokens of `part` (all, train: keys below HELD_OUT_FROM, heldout: the rest) in
        key order, in groups of at most about `memory` bytes of records."""
        if part not in PARTS:
            raise ValueError(part)
        width = 1 << (KEY_BITS - self.bits)
        for b, pieces in enumerate(self.buckets):
            lo, hi = b * width, (b + 1) * width
            if (part == "train" and lo >= HELD_OUT_FROM) or (
                part == "heldout" and hi <= HELD_OUT_FROM
            ):
                continue
            for group in self._groups(pieces, self.bits):
                if part == "all":
                    yield group
                    continue
                cut = int(torch.searchsorted(group.key, HELD_OUT_FROM))
                kept = group.select(slice(None, cut) if part == "train" else slice(cut, None))
                if len(kept):
                    yield kept

    def batches(self, size: int, part: str = "all") -> Iterator[Tokens]:
        """The tokens of `part` in key order, `size` at a time (the last batch may be smaller):
        the same batches however the tokens were split into writers."""
        pending: list[Tokens] = []
        held = 0
        for group in self.tokens(part):
            pending.append(group)
            held += len(group)
            if held < size:
                continue
            joined = Tokens.cat(pending)
            whole = len(joined) - len(joined) % size
            for start in range(0, whole, size):
                yield joined.select(slice(start, start + size))
            pending, held = [joined.select(slice(whole, None))], len(joined) - whole
        if held:
            yield Tokens.cat(pending)

    def _groups(self, pieces: list[_Piece], bits: int) -> Iterator[Tokens]:
        """The tokens of `pieces` (records whose keys share their top `bits` bits), sorted, in
        groups under the memory budget."""
        total = sum(p.count for p in pieces)
        if total == 0:
            return
        if total * self.record <= self.memory or bits + BUCKET_BITS > KEY_BITS:
            records = torch.cat([self._read(p) for p in pieces if p.count])
            yield decode_records(records, self.num_directions, self.dtype, self.seed)
            return
        with (
            disk_errors(self.folder),
            tempfile.TemporaryDirectory(dir=self.folder, prefix=".split-") as tmp,
        ):
            for sub, count in enumerate(self._partition(pieces, bits, Path(tmp))):
                yield from self._groups(
                    [_Piece(Path(tmp) / f"{sub:02d}", count)], bits + BUCKET_BITS
                )
                (Path(tmp) / f"{sub:02d}").unlink()

    def _partition(self, pieces: list[_Piece], bits: int, folder: Path) -> list[int]:
        """Write `pieces`' records into 2**BUCKET_BITS files of `folder` by the next bits of
        their keys, reading a memory budget at a time; returns each file's records."""
        shift = KEY_BITS - bits - BUCKET_BITS
        counts = [0] * 2**BUCKET_BITS
        step = max(1, self.memory // (2 * self.record))
        files = [open(folder / f"{s:02d}", "wb") for s in range(len(counts))]  # noqa: SIM115
        try:
            for piece in pieces:
                for start in range(0, piece.count, step):
                    records = self._read(piece, start, min(step, piece.count - start))
                    example = records[:, :8].contiguous().view(torch.int64)[:, 0]
                    position = records[:, 8:12].contiguous().view(torch.int32)[:, 0].long()
                    sub = (seeded_keys(example, position, self.seed) >> shift) & (len(counts) - 1)
                    added = torch.bincount(sub, minlength=len(counts)).tolist()
                    append_by_bucket(files, records[sub.argsort()], added)
                    counts = [a + b for a, b in zip(counts, added, strict=True)]
        finally:
            for f in files:
                f.close()
        return counts

    def _read(self, piece: _Piece, start: int = 0, count: int | None = None) -> torch.Tensor:
        """[count, record] uint8: records start .. start+count of a piece (all by default)."""
        count = piece.count - start if count is None else count
        data = bytearray(count * self.record)
        with open(piece.path, "rb") as f:
            f.seek(start * self.record)
            if f.readinto(data) != len(data):
                raise UserError(f"{piece.path}: shorter than its manifest says (a damaged cache)")
        return torch.frombuffer(data, dtype=torch.uint8).view(count, self.record)


def remove_cache(folder: Path, names: list[str] | None = None) -> None:
    """Delete the cache files of the writers `names` (all in `folder` by default, with any
    split files a stopped reader left); the folder itself stays."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.name.endswith(".cache.json"):
            writer = path.name.removesuffix(".cache.json")
        elif path.suffix in (".part", ".bin", ".i32"):
            writer = path.name.rsplit(".", 2)[0]  # name.bNN.part
        elif path.name.startswith(".split-") and names is None:
            shutil.rmtree(path)
            continue
        else:
            continue
        if names is None or writer in names:
            path.unlink()
