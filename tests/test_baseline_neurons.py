"""--baseline-neurons: seeded MLP neurons read at the down_proj input, against PEFT itself.

The splits (processes, shards merged, kill and --resume) are in tests/test_scale.py, whose runs
all carry baseline neurons.
"""

from __future__ import annotations

import copy
import json

import pytest

import generate_html_dashboard as dashboard
from backend.contract import ContractError, iter_examples, validate
from backend.data import iter_sequences, read_rows
from backend.generate_activations_data import main
from backend.neurons import choose
from tests.reference import check_summaries, down_proj_inputs
from tests.runs import K, W, load, results, run_cli
from tests.tiny import save_adapter

HIDDEN = 48  # tests/tiny.py's intermediate_size


def brute_force(base, adapter, data, doc) -> None:
    """Every neuron of the document against its coordinate of the down_proj input, read by a
    hook on the PEFT model one example at a time; the neurons are the seeded choice."""
    model, tokenizer = load(base, adapter)
    rows = read_rows(data)
    seqs = list(
        iter_sequences(rows, tokenizer, text_field=None, max_length=None, num_examples=None)
    )
    layers = doc["metadata"]["lora_layers"]
    n = len(doc["baseline_neurons"]) // len(layers)
    chosen = {layer: choose(HIDDEN, n, layer) for layer in layers}
    assert [(n["layer"], n["neuron"]) for n in doc["baseline_neurons"]] == [
        (layer, neuron) for layer in layers for neuron in chosen[layer]
    ]
    values = down_proj_inputs(model, [s.input_ids for s in seqs], chosen)
    for neuron in doc["baseline_neurons"]:
        check_summaries(neuron, values[neuron["layer"], neuron["neuron"]], seqs, tokenizer, K, W)
        assert all("sibling_activations" not in e for e in iter_examples(neuron))


@pytest.fixture(scope="module")
def plain(tmp_path_factory, qwen2_base, rank1_adapter, text_file) -> dict:
    """The run without neurons."""
    folder = tmp_path_factory.mktemp("plain")
    return run_cli(folder, qwen2_base, rank1_adapter, text_file, "--max-batch-tokens", "64")


def test_neurons_match_brute_force(tmp_path, qwen2_base, rank1_adapter, text_file, plain):
    extra = ("--baseline-neurons", "5", "--max-batch-tokens", "64", "--store-sequences")
    doc = run_cli(tmp_path, qwen2_base, rank1_adapter, text_file, *extra)
    validate(doc)
    brute_force(qwen2_base, rank1_adapter, text_file, doc)
    # The directions are exactly those of a run without neurons.
    assert doc["layers"] == plain["layers"]
    # The neurons' examples are stored like the directions'.
    shown = {e["example_index"] for n in doc["baseline_neurons"] for e in iter_examples(n)}
    assert shown and shown <= set(map(int, doc["examples"]))


def test_neurons_of_layers_whose_down_proj_is_not_adapted(tmp_path, qwen2_base, text_file):
    adapter = save_adapter(qwen2_base, tmp_path / "adapter", targets=("gate_proj", "v_proj"),
                           layers=[0, 2])  # fmt: skip
    doc = run_cli(tmp_path, qwen2_base, adapter, text_file, "--baseline-neurons", "5")
    validate(doc)
    assert doc["metadata"]["lora_layers"] == [0, 2]
    brute_force(qwen2_base, adapter, text_file, doc)


@pytest.mark.parametrize("budget", ["40", "4096"])
def test_any_batches_give_the_neurons(tmp_path, qwen2_base, rank1_adapter, text_file, budget):
    """One sequence a batch or all in one: each is the brute force's, up to float rounding
    (other batch shapes round otherwise); the splits of one run give exactly the same
    (tests/test_scale.py)."""
    extra = ("--baseline-neurons", "3", "--max-batch-tokens", budget)
    doc = run_cli(tmp_path, qwen2_base, rank1_adapter, text_file, *extra)
    assert len(doc["baseline_neurons"]) == 9
    brute_force(qwen2_base, rank1_adapter, text_file, doc)


def test_the_choice_is_seeded_by_the_layer():
    assert choose(HIDDEN, 8, 3) == choose(HIDDEN, 8, 3)
    assert choose(HIDDEN, 8, 3) != choose(HIDDEN, 8, 4)
    for layer in range(4):
        chosen = choose(HIDDEN, 8, layer)
        assert chosen == sorted(set(chosen)) and len(chosen) == 8
        assert chosen[0] >= 0 and chosen[-1] < HIDDEN
    assert choose(HIDDEN, HIDDEN, 0) == list(range(HIDDEN))


def test_more_neurons_than_the_mlp_has_is_one_line(tmp_path, capsys, qwen2_base, rank1_adapter,
                                                   text_file):  # fmt: skip
    out = tmp_path / "out.json"
    code = main(["--base-model", str(qwen2_base), "--lora-path", str(rank1_adapter),
                 "--data-file", str(text_file), "--output", str(out), "--quiet",
                 "--baseline-neurons", str(HIDDEN + 1)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.splitlines() == [
        f"error: --baseline-neurons {HIDDEN + 1}: the MLP of layer 0 has only {HIDDEN} neurons"
    ]
    assert not out.exists()


def test_neurons_change_no_effect(tmp_path, qwen2_base, rank1_adapter, text_file):
    """They are never ablated: the effects, and every direction, are those of a run without."""
    extra = ("--effects", "3", "--steer-directions", "2", "--steer-prompts", "1")
    runs = [
        run_cli(tmp_path, qwen2_base, rank1_adapter, text_file, *extra, *neurons)
        for neurons in ((), ("--baseline-neurons", "4"))
    ]
    assert "baseline_neurons" not in runs[0] and len(runs[1]["baseline_neurons"]) == 12
    assert runs[1]["effects"] == runs[0]["effects"]
    assert runs[1]["effects"]["steering"]  # the pinned samples too
    assert results(runs[1])["layers"] == results(runs[0])["layers"]


def test_the_dashboard_renders_a_file_with_neurons(tmp_path, neurons_file):
    data = tmp_path / "with neurons.json"
    data.write_text(json.dumps(neurons_file))
    out = tmp_path / "page.html"
    assert dashboard.main(["--data", str(data), "--output", str(out)]) == 0
    assert out.stat().st_size > 0


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("layer", "baseline_neurons[0].layer: expected an adapted layer ["),
        (
            "order",
            "baseline_neurons[1]: expected after the neuron before it, by layer, then neuron",
        ),
        ("siblings", "baseline_neurons[0].top_positive[0].sibling_activations: expected other"),
        ("bins", "baseline_neurons[0].histogram.counts: expected 50 entries"),
    ],
)
def test_the_contract_checks_the_neurons(neurons_file, case, message):
    doc = copy.deepcopy(neurons_file)
    neurons = doc["baseline_neurons"]
    if case == "layer":
        neurons[0]["layer"] = 7
    elif case == "order":
        neurons[0], neurons[1] = neurons[1], neurons[0]
    elif case == "siblings":
        example = neurons[0]["top_positive"][0]
        example["sibling_activations"] = {"gate_proj": [0.0] * len(example["tokens"])}
    else:
        neurons[0]["histogram"]["counts"].append(0)
        neurons[0]["histogram"]["edges"].append(neurons[0]["histogram"]["edges"][-1] + 1)
    with pytest.raises(ContractError) as raised:
        validate(doc)
    assert str(raised.value).startswith(message), str(raised.value)


@pytest.fixture(scope="module")
def neurons_file(tmp_path_factory, qwen2_base, rank1_adapter, text_file) -> dict:
    folder = tmp_path_factory.mktemp("neurons")
    return run_cli(folder, qwen2_base, rank1_adapter, text_file, "--baseline-neurons", "2")
