"""The one entry point: the CLI's options are RunConfig's fields, a script that calls `analyze`
on a model it loaded gets what the CLI writes, and the run identity that a resume compares is
derived from the config."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from backend import UserError
from backend.config import RunConfig
from backend.data import read_rows
from backend.generate_activations_data import build_parser, main
from backend.output import build_document
from backend.pipeline import analyze
from tests.runs import load


def results(document: dict) -> dict:
    """The document as JSON would carry it, without the time it was made."""
    document = json.loads(json.dumps(document))
    del document["metadata"]["created_at"]
    return document


def test_cli_options_are_the_config_fields():
    parse = build_parser().parse_args
    assert RunConfig.from_args(parse(["--lora-path", "a"])) == RunConfig(lora_path="a")
    options = ["--lora-path", "a", "--num-examples", "all", "--shard", "1/3", "--top-k", "3"]
    options += ["--checkpoint-every", "5m", "--resume", "--data-file", "d.jsonl"]
    assert RunConfig.from_args(parse(options)) == RunConfig(
        lora_path="a", num_examples=None, shard=(1, 3), top_k=3, checkpoint_every=(None, 300.0),
        resume=True, data_file=parse(options).data_file,
    )  # fmt: skip


def test_a_script_gets_what_the_cli_writes(tmp_path, qwen2_base, rank1_adapter, text_file):
    out = tmp_path / "cli.json"
    argv = ["--base-model", str(qwen2_base), "--lora-path", str(rank1_adapter), "--quiet"]
    argv += ["--data-file", str(text_file), "--top-k", "4", "--store-sequences"]
    assert main([*argv, "--output", str(out)]) == 0
    model, tokenizer = load(qwen2_base, rank1_adapter)
    config = RunConfig(
        base_model=str(qwen2_base), lora_path=str(rank1_adapter), data_file=text_file, top_k=4,
        store_sequences=True,
    )  # fmt: skip
    state = analyze(model, tokenizer, list(read_rows(text_file)), config)
    assert results(build_document(state)) == results(json.loads(out.read_text()))


def test_rows_of_token_ids_are_taken_as_they_are(qwen2_base, rank1_adapter, text_file):
    model, tokenizer = load(qwen2_base, rank1_adapter)
    rows = list(read_rows(text_file))
    tokens = [{"input_ids": tokenizer(row["text"])["input_ids"]} for row in rows]
    config = RunConfig(lora_path=str(rank1_adapter), num_examples=None)
    expected = results(build_document(analyze(model, tokenizer, rows, config)))
    assert results(build_document(analyze(model, tokenizer, tokens, config))) == expected
    with pytest.raises(UserError, match=r"^'input_ids' must be a list of token ids"):
        analyze(model, tokenizer, [{"input_ids": [3, -1]}], config)


def test_resume_compares_the_configs_identity(tmp_path, qwen2_base, rank1_adapter, text_file):
    model, tokenizer = load(qwen2_base, rank1_adapter)
    rows = list(read_rows(text_file))

    def broken():
        yield from rows[:12]  # three sort windows of 4 rows, each checkpointed
        raise RuntimeError("the data source broke")

    config = RunConfig(
        lora_path=str(rank1_adapter), num_examples=None, sort_window=4,
        checkpoint_every=(1, None), resume=True,
    )  # fmt: skip
    checkpoint = tmp_path / "run.ckpt"
    with pytest.raises(RuntimeError, match="the data source broke"):
        analyze(model, tokenizer, broken(), config, checkpoint=checkpoint)
    for name, value in (("min_token_count", 2), ("top_k", 3), ("logit_tokens", 5)):
        other = replace(config, **{name: value})
        with pytest.raises(UserError, match=rf"checkpoint of another run \({name} differ\)"):
            analyze(model, tokenizer, rows, other, checkpoint=checkpoint)
    resumed = analyze(model, tokenizer, rows, config, checkpoint=checkpoint)
    assert 0 < resumed.counters["num_examples"] == len([r for r in rows if r["text"]])
    unbroken = analyze(model, tokenizer, rows, replace(config, resume=False))
    assert results(build_document(resumed)) == results(build_document(unbroken))
