"""Dataset rows -> token sequences -> token-budget batches.

Rows are read lazily and tokenized a window at a time, so memory does not grow with the dataset;
within a window, sequences are sorted by length so batches carry little padding.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from backend import UserError, warn

S1K_FIELDS = ("question", "deepseek_thinking_trajectory", "deepseek_attempt")
CHAT_FIELDS = ("messages", "conversations")
Row = dict[str, Any] | None  # None: a row that could not be read, skipped in place


@dataclass
class Sequence:
    example_index: int  # row index in the input dataset
    input_ids: list[int]
    truncated: bool


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L] padded with 0
    attention_mask: torch.Tensor  # [B, L] 1 for real tokens
    example_index: torch.Tensor  # [B]
    lengths: torch.Tensor  # [B]
    real: torch.Tensor  # [N] positions of the real tokens in the flattened [B * L] layout

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


def s1k_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """An s1K-1.1 row as a chat: the thinking trace sits inside the assistant turn."""
    answer = (
        f"<think>\n{row['deepseek_thinking_trajectory']}\n</think>\n\n{row['deepseek_attempt']}"
    )
    return [
        {"role": "user", "content": row["question"]},
        {"role": "assistant", "content": answer},
    ]


def _chat(row: dict[str, Any]) -> list[dict[str, str]] | None:
    if all(field in row for field in S1K_FIELDS):
        return s1k_messages(row)
    for field in CHAT_FIELDS:
        if isinstance(row.get(field), list):
            return [{"role": m["role"], "content": m["content"]} for m in row[field]]
    return None


def row_content(
    row: dict[str, Any], text_field: str | None
) -> str | list[dict[str, str]] | tuple[int, ...]:
    """What a row says: raw text (a string), a chat (a list of messages), or tokens already
    (a tuple of token ids, from an 'input_ids' list)."""
    if text_field is not None:
        if text_field not in row:
            raise UserError(
                f"text field {text_field!r} not in the data; fields are: {', '.join(sorted(row))}"
            )
        return str(row[text_field])
    messages = _chat(row)
    if messages is not None:
        return messages
    if "text" in row:
        return str(row["text"])
    if isinstance(row.get("input_ids"), list):
        ids = row["input_ids"]
        if not all(isinstance(i, int) and i >= 0 for i in ids):
            raise UserError("'input_ids' must be a list of token ids (integers >= 0)")
        return tuple(ids)
    raise UserError(
        "cannot tell how to read rows with fields "
        f"{', '.join(sorted(row))}: pass --text-field NAME, or use the s1K schema "
        f"({', '.join(S1K_FIELDS)}), a 'messages' list or an 'input_ids' list"
    )


def tokenize_row(row: dict[str, Any], tokenizer: Any, text_field: str | None) -> list[int]:
    """Raw text as `tokenizer(text)["input_ids"]`; a chat through the tokenizer's chat template;
    token ids as they are."""
    content = row_content(row, text_field)
    if isinstance(content, str):
        return tokenizer(content)["input_ids"]
    if isinstance(content, tuple):
        return list(content)
    text = tokenizer.apply_chat_template(content, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def peek(rows: Iterable[Row], source: str) -> tuple[dict[str, Any], Iterator[Row]]:
    """The first readable row (to check before any model is loaded), and all rows again."""
    iterator, seen = iter(rows), []
    for row in iterator:
        seen.append(row)
        if row is not None:
            return row, itertools.chain(seen, iterator)
    raise UserError(f"no rows in {source}")


def read_rows(path: Path, skipped: list[int] | None = None, quiet: bool = False) -> Iterator[Row]:
    """Rows of a local file: JSONL, JSON (a list of objects), Parquet, or text (a row per line).

    A malformed JSONL line is skipped with a warning (none if quiet: a file read once more),
    its line number appended to `skipped`; it still counts as a row (None), so every later row
    keeps its index.
    """
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a data file")
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson"):
            yield from _read_jsonl(path, [] if skipped is None else skipped, quiet)
        elif suffix == ".json":
            yield from _read_json(path)
        elif suffix == ".parquet":
            yield from _read_parquet(path)
        else:
            with path.open(encoding="utf-8") as f:
                for line in f:
                    yield {"text": line.rstrip("\n")}
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def count_rows(path: Path) -> int:
    """How many rows read_rows(path) gives, found cheaply: the non-blank lines of a JSONL file
    (a malformed line is a row too), the lines of a text file, the length of a JSON list, the
    row count in a Parquet file's footer. Raises what read_rows would for a file it cannot read."""
    suffix = path.suffix.lower()
    if suffix == ".json":  # a list's length needs the list: nothing cheaper than parsing it
        return sum(1 for _ in read_rows(path))
    try:
        if suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                return pq.ParquetFile(path).metadata.num_rows
            except pa.ArrowException as e:
                raise UserError(f"{path}: not a readable Parquet file ({e})") from None
        if suffix in (".jsonl", ".ndjson"):  # lines as _read_jsonl splits them: bytes at "\n"
            with path.open("rb") as f:
                return sum(1 for line in f if line.strip())
        with path.open(encoding="utf-8", errors="replace") as f:  # as read_rows splits text
            return sum(1 for _ in f)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def _read_jsonl(path: Path, skipped: list[int], quiet: bool) -> Iterator[Row]:
    with path.open("rb") as f:  # bytes: a line that is not UTF-8 is one malformed line
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8-sig").rstrip("\r\n"))
            except UnicodeDecodeError:
                problem = "not UTF-8 text"
            except json.JSONDecodeError as e:
                problem = f"not valid JSON ({e.msg})"
            else:
                if isinstance(row, dict):
                    yield row
                    continue
                problem = "not a JSON object"
            if not quiet:
                warn(f"{path}:{number}: {problem}; line skipped")
            skipped.append(number)
            yield None


def _read_json(path: Path) -> Iterator[dict[str, Any]]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(rows, list):
        raise UserError(f"{path}: expected a JSON list of objects")
    for index, row in enumerate(rows):  # all checked before the first row is used
        if not isinstance(row, dict):
            raise UserError(f"{path}: item {index} of the list is not a JSON object")
    yield from rows


def _read_parquet(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        for record_batch in pq.ParquetFile(path).iter_batches():
            yield from record_batch.to_pylist()
    except pa.ArrowException as e:
        raise UserError(f"{path}: not a readable Parquet file ({e})") from None


def read_hub_rows(name: str, split: str) -> Iterable[dict[str, Any]]:
    """Rows of a dataset through `datasets` (a hub id, or a local dataset directory), without
    its progress bars (our bar counts the rows)."""
    import datasets

    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(name, split=split)
    except (OSError, ValueError) as e:  # not found, offline, an unknown split
        raise UserError(f"cannot read dataset {name} ({split}): {str(e).splitlines()[0]}") from None


def iter_sequences(
    rows: Iterable[Row],
    tokenizer: Any,
    *,
    text_field: str | None,
    max_length: int | None,
    num_examples: int | None,
    start_row: int = 0,
) -> Iterator[Sequence]:
    """Tokenized rows below num_examples, from start_row on (earlier rows are not tokenized).

    Rows with no tokens, and unreadable rows (None), are skipped but keep their index.
    """
    # What transformers would log (hidden by loading.quiet_libraries): said once, as ours.
    limit = getattr(tokenizer, "model_max_length", None)
    warned = not isinstance(limit, int) or limit > 10**9  # "no limit" is a huge number
    # islice: no row past num_examples is read, so a reader counts only the rows used.
    for index, row in enumerate(itertools.islice(rows, num_examples)):
        if index < start_row or row is None:
            continue
        ids = list(tokenize_row(row, tokenizer, text_field))
        if not ids:
            continue
        truncated = max_length is not None and len(ids) > max_length
        ids = ids[:max_length] if truncated else ids
        if not warned and len(ids) > limit:
            warn(
                f"example {index} has {len(ids)} tokens, more than the model's maximum length "
                f"{limit}: its activations past that may mean little (--max-length cuts them)"
            )
            warned = True
        yield Sequence(index, ids, truncated)


@dataclass
class Position:
    """Where a pass stands: `batch` batches of the sort window that starts at row `row` are done,
    and that window's first batch is batch `number` of the whole pass.

    Windows and their batches are a pure function of the rows, so a pass that starts reading at
    `row` and drops `batch` batches sees exactly what an unbroken one would have.
    """

    row: int = 0
    batch: int = 0
    number: int = 0


def iter_batches(
    sequences: Iterable[Sequence],
    max_batch_tokens: int,
    sort_window: int = 256,
    start: Position | None = None,
    slot: tuple[int, int] = (0, 1),
) -> Iterator[tuple[Batch, list[Sequence], Position]]:
    """Token-budget batches (B * L <= max_batch_tokens) of length-sorted sequences.

    Sorting happens inside windows of `sort_window` sequences: padding stays small while memory
    stays bounded. A sequence longer than the budget gets a batch of its own. Of the pass's
    batches, this slot (i, n) takes those numbered i mod n: every process or shard forms the same
    batches, so together they compute exactly what one process would. Each batch comes with the
    position just after it.
    """
    start = start or Position()
    number, skip = start.number, start.batch
    for window in _windows(sequences, sort_window):
        groups = list(_pack(window, max_batch_tokens))
        for i, group in enumerate(groups):
            if i >= skip and (number + i) % slot[1] == slot[0]:
                yield collate(group), group, Position(window[0].example_index, i + 1, number)
        number, skip = number + len(groups), 0


def _windows(sequences: Iterable[Sequence], size: int) -> Iterator[list[Sequence]]:
    window: list[Sequence] = []
    for seq in sequences:
        window.append(seq)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _pack(window: list[Sequence], max_batch_tokens: int) -> Iterator[list[Sequence]]:
    group: list[Sequence] = []
    for seq in sorted(window, key=lambda s: len(s.input_ids), reverse=True):
        # Longest first: the first member of a group sets its padded length.
        if group and (len(group) + 1) * len(group[0].input_ids) > max_batch_tokens:
            yield group
            group = []
        group.append(seq)
    if group:
        yield group


def collate(group: list[Sequence]) -> Batch:
    lengths = torch.tensor([len(s.input_ids) for s in group])
    input_ids = torch.zeros(len(group), int(lengths.max()), dtype=torch.long)
    for row, seq in enumerate(group):
        input_ids[row, : len(seq.input_ids)] = torch.tensor(seq.input_ids)
    attention_mask = torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask.long(),
        example_index=torch.tensor([s.example_index for s in group]),
        lengths=lengths,
        real=attention_mask.flatten().nonzero().squeeze(1),
    )
