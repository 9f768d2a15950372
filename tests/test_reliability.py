"""Bad input ends in one clear line and writes nothing; bad rows are skipped in place; a batch
that runs out of GPU memory is retried in halves with the same result."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from backend.generate_activations_data import main
from tests.runs import assert_same
from tests.tiny import save_adapter, save_base


@pytest.fixture
def cli(tmp_path, qwen2_base, rank1_adapter, text_file) -> Callable[..., list[str]]:
    """argv of a good run writing into tmp_path/out; later options override earlier ones."""

    def argv(*extra: str) -> list[str]:
        return ["--base-model", str(qwen2_base), "--lora-path", str(rank1_adapter),
                "--data-file", str(text_file), "--output", str(tmp_path / "out" / "o.json"),
                "--top-k", "4", "--context-window", "2", "--quiet", *extra]  # fmt: skip

    return argv


def assert_one_line_error(capsys, code: int, mention: str) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == 1, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and mention in lines[0], err
    assert "Traceback" not in err
    return lines[0]


def copy_adapter(adapter: Path, to: Path, **config) -> Path:
    shutil.copytree(adapter, to)
    path = to / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | config))
    return to


def warnings(capsys) -> list[str]:
    """The warning lines on stderr (loading libraries may add progress bars there)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ---- the model and the adapter ---------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, qwen2_base, rank1_adapter) -> dict[str, tuple[list[str], str]]:
    """case -> (options, what the message must say)"""
    tmp, base, adapter = tmp_path_factory.mktemp("models"), qwen2_base, rank1_adapter
    (tmp / "empty").mkdir()
    (tmp / "a file").write_text("x")
    broken = copy_adapter(adapter, tmp / "broken")
    (broken / "adapter_config.json").write_text("{not json")
    no_weights = copy_adapter(adapter, tmp / "no weights")
    (no_weights / "adapter_model.safetensors").unlink()
    garbage = copy_adapter(adapter, tmp / "garbage")
    (garbage / "adapter_model.safetensors").write_bytes(b"\xff" * 100)
    wider = copy_adapter(adapter, tmp / "wider")  # gate_proj reads 64 features, not 32
    weights = load_file(wider / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.gate_proj.lora_A.weight"
    weights[key] = torch.ones(1, 64)
    save_file(weights, wider / "adapter_model.safetensors")
    deeper = save_adapter(save_base(tmp / "5 layers", layers=5), tmp / "deeper")
    return {
        "adapter missing": (["--lora-path", str(tmp / "nope")], "adapter not found"),
        "adapter a file": (["--lora-path", str(tmp / "a file")], "is a file"),
        "adapter no config": (["--lora-path", str(tmp / "empty")], "no adapter_config.json"),
        "adapter config broken": (["--lora-path", str(broken)], "not valid JSON"),
        "adapter no weights": (["--lora-path", str(no_weights)], "no adapter weights"),
        "adapter weights broken": (["--lora-path", str(garbage)], "is not a safetensors file"),
        "merged": (["--lora-path", str(base)], "full model (a merged adapter?)"),
        "not lora": (
            ["--lora-path", str(copy_adapter(adapter, tmp / "ia3", peft_type="IA3"))],
            "is a IA3 adapter; only plain LoRA adapters (peft_type LORA, without DoRA)",
        ),
        "dora": (
            ["--lora-path", str(copy_adapter(adapter, tmp / "dora", use_dora=True))],
            "is a DoRA adapter; only plain LoRA",
        ),
        "other sizes": (
            ["--lora-path", str(wider)],
            "model.layers.1.mlp.gate_proj is 48x32 (out x in) there, but the adapter has "
            "lora_A 1x64 and lora_B 48x1",
        ),
        "more layers": (["--lora-path", str(deeper)], "it adapts model.layers.3.mlp.down_proj"),
        "base missing": (["--base-model", str(tmp / "nope")], "base model directory not found"),
        "base not a model": (["--base-model", str(tmp / "empty")], "no config.json"),
    }


MODEL_CASES = ["adapter missing", "adapter a file", "adapter no config", "adapter config broken",
               "adapter no weights", "adapter weights broken", "merged", "not lora", "dora",
               "other sizes", "more layers", "base missing", "base not a model"]  # fmt: skip


def refuse_loading(*args, **kwargs):
    raise AssertionError("the model was loaded before the error was found")


@contextmanager
def no_model_loaded() -> Iterator[None]:
    """Fail if any model's weights are loaded inside the block: the error must come before."""
    from transformers import PreTrainedModel

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PreTrainedModel, "from_pretrained", refuse_loading)
        yield


@pytest.mark.parametrize("case", MODEL_CASES)
def test_bad_model_or_adapter_is_refused_before_loading(tmp_path, capsys, cli, bad_models,
                                                        case):  # fmt: skip
    options, mention = bad_models[case]
    capsys.readouterr()  # what building the models printed
    with no_model_loaded():
        code = main(cli(*options))
    assert_one_line_error(capsys, code, mention)
    assert not (tmp_path / "out").exists()


def cache_as_hub_repo(cache: Path, repo_id: str, files: Path) -> None:
    """`files` as the cached snapshot of hub repository `repo_id`, the way huggingface_hub lays
    out its cache."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(files, repo / "snapshots" / ("0" * 40))


def test_cached_hub_repos_are_checked_before_loading(tmp_path, capsys, cli, qwen2_base,
                                                    bad_models, monkeypatch):  # fmt: skip
    """A hub adapter and base model already in the local cache are read from there."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache_as_hub_repo(cache, "tester/tiny-qwen2", qwen2_base)
    cache_as_hub_repo(cache, "tester/wider-adapter", Path(bad_models["other sizes"][0][1]))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    capsys.readouterr()
    with no_model_loaded():
        code = main(cli("--base-model", "tester/tiny-qwen2", "--lora-path", "tester/wider-adapter"))
    assert_one_line_error(capsys, code, "tester/wider-adapter does not fit the base model: "
                          "model.layers.1.mlp.gate_proj is 48x32")  # fmt: skip


# ---- the data ----------------------------------------------------------------------------


def bad_data(tmp: Path) -> dict[str, tuple[list[str], str]]:
    (tmp / "empty.jsonl").write_text("")
    (tmp / "blank.jsonl").write_text("\n  \n")
    (tmp / "list.json").write_text("[]")
    (tmp / "invalid.json").write_text('[{"text": "a"},')
    (tmp / "scalars.json").write_text('[{"text": "a"}, 3]')
    (tmp / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    (tmp / "fake.parquet").write_text("not parquet")
    write_lines(tmp / "bad.jsonl", ["{bad", "[1, 2]"])
    write_lines(tmp / "fields.jsonl", [json.dumps({"prompt": "a", "id": 1})])
    data = {
        "missing": ("nope.jsonl", "data file not found"),
        "directory": (".", "is a directory, not a data file"),
        "empty": ("empty.jsonl", "no rows in"),
        "blank lines": ("blank.jsonl", "no rows in"),
        "empty list": ("list.json", "no rows in"),
        "invalid json": ("invalid.json", "not valid JSON (Expecting value: line 1 column 16"),
        "not objects": ("scalars.json", "item 1 of the list is not a JSON object"),
        "not utf-8": ("latin1.txt", "not UTF-8 text"),
        "not parquet": ("fake.parquet", "not a readable Parquet file"),
        "only bad lines": ("bad.jsonl", "no rows in"),
        "unknown fields": ("fields.jsonl", "cannot tell how to read rows with fields id, prompt"),
    }
    return {case: (["--data-file", str(tmp / name)], says) for case, (name, says) in data.items()}


DATA_CASES = ["missing", "directory", "empty", "blank lines", "empty list", "invalid json",
              "not objects", "not utf-8", "not parquet", "only bad lines",
              "unknown fields"]  # fmt: skip


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data_is_refused_before_loading(tmp_path, capsys, cli, case):
    options, mention = bad_data(tmp_path)[case]
    with no_model_loaded():
        code = main(cli(*options))
    err = capsys.readouterr().err
    *warnings, last = err.splitlines()
    assert code == 1 and last.startswith("error: ") and mention in last, err
    assert all(line.startswith("warning: ") for line in warnings) and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_rows_without_tokens_are_an_empty_dataset(tmp_path, capsys, cli):
    data = write_lines(tmp_path / "blank.jsonl", [json.dumps({"text": ""})] * 3)
    code = main(cli("--data-file", str(data)))
    err = capsys.readouterr().err
    assert code == 1 and err.splitlines()[-1] == f"error: no examples with tokens in {data}"
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_missing_text_field_names_the_fields(capsys, cli):
    with no_model_loaded():
        code = main(cli("--text-field", "body"))
    assert_one_line_error(capsys, code, "text field 'body' not in the data; fields are: id, text")


def test_unknown_split_of_a_local_dataset(tmp_path, capsys, qwen2_base, rank1_adapter,
                                          text_file):  # fmt: skip
    folder = tmp_path / "dataset"
    folder.mkdir()
    shutil.copy(text_file, folder / "train.jsonl")
    with no_model_loaded():
        code = main(["--base-model", str(qwen2_base), "--lora-path", str(rank1_adapter),
                     "--dataset", str(folder), "--split", "validation",
                     "--output", str(tmp_path / "out" / "o.json"), "--quiet"])  # fmt: skip
    err = capsys.readouterr().err  # after `datasets`' own progress lines
    assert code == 1 and "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"error: cannot read dataset {folder} (validation): "
        """Unknown split "validation". Should be one of ['train']."""
    )


def test_malformed_lines_are_skipped_in_place_and_counted(tmp_path, capsys, cli, text_file):
    """A malformed line is a row that is skipped: later rows keep their example_index, so the
    result equals that of the same file with the line's text emptied."""
    lines = text_file.read_text().splitlines()
    broken = list(lines)
    broken[3], broken[9] = '{"text": "unfinished', "\udcff"  # invalid JSON, not UTF-8
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes("\n".join(broken).encode("utf-8", "surrogateescape") + b"\n")
    emptied = list(lines)
    emptied[3] = emptied[9] = json.dumps({"text": ""})
    good = write_lines(tmp_path / "emptied.jsonl", emptied)
    out = tmp_path / "out" / "o.json"
    assert main(cli("--data-file", str(good))) == 0
    expected = json.loads(out.read_text())
    assert main(cli("--data-file", str(bad))) == 0
    got = json.loads(out.read_text())
    assert warnings(capsys) == [
        f"warning: {bad}:4: not valid JSON (Unterminated string starting at); line skipped",
        f"warning: {bad}:10: not UTF-8 text; line skipped",
    ]
    assert got["metadata"].pop("num_skipped_rows") == 2
    assert expected["metadata"].pop("num_skipped_rows") == 0
    got["metadata"]["dataset"] = expected["metadata"]["dataset"]
    assert_same(got, expected, exact=True)


def test_skipped_rows_are_counted_once_over_shards(tmp_path, capsys, cli, text_file):
    lines = text_file.read_text().splitlines()
    bad = write_lines(tmp_path / "bad.jsonl", [*lines[:7], "{oops", *lines[7:]])
    shards = [str(tmp_path / f"shard{i}.pt") for i in range(2)]
    options = ("--data-file", str(bad), "--max-batch-tokens", "64")
    for i, shard in enumerate(shards):
        assert main(cli(*options, "--shard", f"{i}/2", "--output", shard)) == 0
    out = tmp_path / "merged.json"
    assert main(["merge", str(out), *shards]) == 0
    assert json.loads(out.read_text())["metadata"]["num_skipped_rows"] == 1


# ---- options and output --------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, value, says",
    [
        ("--top-k", "0", "must be at least 1, got 0"),
        ("--top-k", "-3", "must be at least 1, got -3"),
        ("--top-k", "many", "invalid positive_int value: 'many'"),
        ("--context-window", "-1", "must not be negative, got -1"),
        ("--histogram-bins", "0", "must be at least 1, got 0"),
        ("--max-batch-tokens", "0", "must be at least 1, got 0"),
        ("--max-length", "0", "must be at least 1, got 0"),
        ("--num-examples", "0", "must be at least 1, got 0"),
        ("--shard", "2/2", "expected I/N with 0 <= I < N, got '2/2'"),
        ("--shard", "1", "expected I/N with 0 <= I < N, got '1'"),
        ("--shard", "-1/2", "expected I/N with 0 <= I < N, got '-1/2'"),
        ("--checkpoint-every", "0", "must be at least 1, got 0"),
        ("--checkpoint-every", "0m", "minutes must be positive, got '0m'"),
        ("--dtype", "int8", "invalid choice: 'int8'"),
    ],
)
def test_invalid_options_are_usage_errors(tmp_path, capsys, cli, option, value, says):
    with pytest.raises(SystemExit) as exit_:
        main(cli(f"{option}={value}"))  # "=": a value like -1/2 is not taken for an option
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith(f"generate_activations_data.py: error: argument {option}: {says}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["under a file", "a directory", "checkpoint under a file"])
def test_unwritable_output_is_refused_before_loading(tmp_path, capsys, cli,
                                                     case):  # fmt: skip
    (tmp_path / "file").write_text("x")
    options, mention = {
        "under a file": (["--output", str(tmp_path / "file" / "o.json")], "is not a directory"),
        "a directory": (["--output", str(tmp_path)], "cannot write (it is a directory)"),
        "checkpoint under a file": (
            ["--checkpoint", str(tmp_path / "file" / "c.ckpt")],
            "is not a directory",
        ),
    }[case]
    with no_model_loaded():
        code = main(cli(*options))
    assert_one_line_error(capsys, code, mention)
    assert (tmp_path / "file").read_text() == "x"
    assert not (tmp_path / "out").exists()


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


def test_keyboard_interrupt_is_one_line(tmp_path, capsys, cli):
    """A KeyboardInterrupt that no handler of ours defers (Ctrl-C while loading, a second
    Ctrl-C during the pass) stops the run without a traceback."""

    def hook(module, args):
        raise KeyboardInterrupt

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        code = main(cli())
    finally:
        handle.remove()
    err = capsys.readouterr().err
    assert code == 130 and err.splitlines()[-1] == "interrupted" and "Traceback" not in err
    assert not (tmp_path / "out" / "o.json").exists()
