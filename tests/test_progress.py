"""Quiet, honest progress: the bar's total is the number of rows where it is known, the
libraries' own bars and deprecation warnings stay off the terminal, and --quiet leaves only our
`warning:` and `error:` lines. The command runs in a real process, its stderr a terminal."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from backend.data import count_rows, iter_sequences, read_rows
from tests.tiny import WORDS, make_tokenizer, random_texts

SCRIPT = Path(__file__).resolve().parent.parent / "backend" / "generate_activations_data.py"
BAR = re.compile(r"\| *(\d+)/(\d+) \[")  # tqdm's "| 11/11 [" (no total: "11ex [")


def run_in_terminal(argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the command, its stderr a 120-column pseudo-terminal (as
    in a shell: tqdm draws its bar only on a terminal with a width)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
    )
    os.close(slave)
    err = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the process closed its end
            break
        if not chunk:
            break
        err += chunk
    os.close(master)
    out = process.stdout.read().decode()
    return process.wait(timeout=300), out, err.decode()


def argv(base: Path, adapter: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--base-model", str(base), "--lora-path", str(adapter), "--data-file", str(data),
            "--output", str(out), "--top-k", "4", "--context-window", "2", *extra]  # fmt: skip


def bar_counts(err: str) -> list[tuple[int, int]]:
    """Every (done, total) the bar drew."""
    return [(int(done), int(total)) for done, total in BAR.findall(err)]


@pytest.fixture(scope="module")
def rows_11(tmp_path_factory) -> dict[str, Path]:
    """The same 11 rows as JSONL (with a blank line, which is no row), a JSON list and text."""
    texts = random_texts(11, seed=3)
    folder = tmp_path_factory.mktemp("rows")
    jsonl = folder / "rows.jsonl"
    lines = [json.dumps({"text": t}) for t in texts]
    jsonl.write_text("\n".join([*lines[:4], "  ", *lines[4:]]) + "\n")
    as_json = folder / "rows.json"
    as_json.write_text(json.dumps([{"text": t} for t in texts]))
    text = folder / "rows.txt"
    text.write_text("".join(t.replace("\n", " ") + "\n" for t in texts))
    return {"jsonl": jsonl, "json": as_json, "txt": text}


@pytest.mark.parametrize(
    ("kind", "extra", "total"),
    [
        ("jsonl", [], 11),
        ("json", ["--num-examples", "all"], 11),
        ("txt", ["--num-examples", "5"], 5),
    ],
)
def test_bar_total_is_the_number_of_rows(tmp_path, qwen2_base, rank1_adapter, rows_11, kind,
                                         extra, total):  # fmt: skip
    code, out, err = run_in_terminal(
        argv(qwen2_base, rank1_adapter, rows_11[kind], tmp_path / "o.json", *extra)
    )
    assert code == 0, err
    counts = bar_counts(err)
    assert counts and {t for _, t in counts} == {total}, err  # never /100, the default
    assert counts[-1] == (total, total), err
    # Only our bar reached the terminal: no library's bar, deprecation or line of its own.
    assert "Loading weights" not in err and "Warning" not in err, err
    assert "it/s" not in err, err  # the unit of every bar but ours ("ex/s")
    for line in re.split(r"[\r\n]+", err):
        assert not line.strip() or BAR.search(line), repr(line)
    assert out.startswith(f"{total} examples, "), out


def test_quiet_prints_only_our_warnings(tmp_path, qwen2_base, rank1_adapter):
    """--quiet on a base model that lacks a weight and on a file with a malformed line: stderr
    is our two `warning:` lines (transformers' load report, a table, is rephrased as one),
    stdout nothing."""
    base = tmp_path / "base"
    shutil.copytree(qwen2_base, base)
    weights = load_file(base / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    data = tmp_path / "rows.jsonl"
    lines = [json.dumps({"text": t}) for t in random_texts(6, seed=4)]
    data.write_text("\n".join([*lines[:2], "{not json", *lines[2:]]) + "\n")
    code, out, err = run_in_terminal(
        argv(base, rank1_adapter, data, tmp_path / "o.json", "--quiet")
    )
    assert code == 0, err
    assert out == ""
    assert err.splitlines() == [
        f"warning: {base}: weights missing from its checkpoint (or of another shape) were "
        "initialized at random (1, e.g. model.norm.weight); its activations are not the "
        "trained model's",
        f"warning: {data}:3: not valid JSON (Expecting property name enclosed in double "
        "quotes); line skipped",
    ], err


def test_row_count_is_what_the_reader_reads(tmp_path):
    """count_rows, which does not parse the rows, against read_rows, which does."""
    rows = [{"text": t} for t in random_texts(7, seed=5)]
    jsonl = tmp_path / "a.jsonl"
    # blank lines (no rows), two malformed ones (rows: skipped in place), CRLF endings
    lines = [json.dumps(rows[0]).encode() + b"\n", b"\n", b"{bad\n", b"\xff\xfe\n", b" \t\n"]
    lines += [json.dumps(r).encode() + b"\r\n" for r in rows[1:]] + [b"\n"]
    jsonl.write_bytes(b"".join(lines))
    text = tmp_path / "a.txt"
    text.write_text("one\n\ntwo\r\nthree\rfour", newline="")
    json_list = tmp_path / "a.json"
    json_list.write_text(json.dumps(rows))
    parquet = tmp_path / "a.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows * 3), parquet, row_group_size=5)
    for path in (jsonl, text, json_list, parquet):
        assert count_rows(path) == sum(1 for _ in read_rows(path, skipped=[])), path
    assert [count_rows(p) for p in (jsonl, text, json_list, parquet)] == [9, 5, 7, 21]


def test_a_sequence_longer_than_the_model_is_one_warning_of_ours(capsys):
    """transformers' own line about it is hidden (quiet_libraries): ours says it once."""
    tokenizer = make_tokenizer()
    tokenizer.model_max_length = 8
    rows = [{"text": "wait"}, {"text": " ".join(WORDS)}, {"text": " ".join(WORDS[::-1])}]

    def read(max_length: int | None) -> tuple[list[str], list[int]]:
        """Our warning lines, and the sequences' lengths."""
        sequences = iter_sequences(
            rows, tokenizer, text_field=None, max_length=max_length, num_examples=None
        )
        lengths = [len(s.input_ids) for s in sequences]
        err = capsys.readouterr().err
        return [line for line in err.splitlines() if line.startswith("warning:")], lengths

    warned, lengths = read(None)
    assert lengths[0] <= 8 < min(lengths[1:])  # two are too long: said once, of the first
    assert warned == [
        f"warning: example 1 has {lengths[1]} tokens, more than the model's maximum length 8: "
        "its activations past that may mean little (--max-length cuts them)"
    ]
    assert read(8)[0] == []  # cut to the model's length: nothing to say
