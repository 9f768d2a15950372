"""backend.contract.validate: it accepts what the backend and the synthetic builder write, and
fields it does not know, and rejects each break of the format, naming the field by its path."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

import backend.contract as contract
import generate_html_dashboard as dashboard
from backend.contract import ContractError, iter_directions, iter_examples, validate
from backend.generate_activations_data import main
from backend.output import write_json_atomic
from tests.synthetic import assert_consistent, make_activations
from tests.tiny import save_adapter

ROOT = Path(__file__).resolve().parent.parent
ATTENTION_AND_MLP = ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def backend_file(tmp_path_factory, llama_base, text_file) -> dict:
    """A real file with every field the backend writes: rank 2 on attention and the MLP of two
    layers (so logit effects, siblings and attention spaces), with --store-sequences."""
    tmp_path = tmp_path_factory.mktemp("contract")
    adapter = save_adapter(
        llama_base, tmp_path / "adapter", rank=2, targets=ATTENTION_AND_MLP, layers=[0, 2]
    )
    out = tmp_path / "out.json"
    argv = ["--base-model", str(llama_base), "--lora-path", str(adapter)]
    argv += ["--data-file", str(text_file), "--output", str(out), "--quiet", "--store-sequences"]
    argv += ["--top-k", "4", "--context-window", "3", "--min-token-count", "2"]
    assert main(argv) == 0
    return json.loads(out.read_text())


def synthetic() -> dict:
    """Rank 2 on the MLP and q_proj of two layers, with stored sequences."""
    data = make_activations(modules=("gate_proj", "up_proj", "down_proj", "q_proj"), rank=2)
    data["examples"] = {
        str(e["example_index"]): {"tokens": ["a", "b"], "source": "synthetic:train"}
        for ref in iter_directions(data)
        for e in iter_examples(ref.direction)
    }
    return data


def test_a_backend_file_is_valid(backend_file):
    validate(backend_file)
    assert_consistent(backend_file)
    # Every optional field is there, so that validate has checked each of them.
    directions = [ref.direction for ref in iter_directions(backend_file)]
    assert all("top_tokens" in d and "bottom_tokens" in d for d in directions)
    assert {ref.module for ref in iter_directions(backend_file) if "logit_effects" in ref.direction}
    assert all("sibling_activations" in e for d in directions for e in iter_examples(d))
    assert backend_file["examples"]


def test_a_synthetic_file_is_valid():
    data = synthetic()
    validate(data)
    assert_consistent(data)


def test_fields_it_does_not_know_are_accepted():
    data = synthetic()
    direction = data["layers"][1]["projections"]["down_proj"]["directions"][1]
    for where in (
        data,
        data["metadata"],
        data["layers"][1],
        data["layers"][1]["projections"]["down_proj"],
        direction,
        direction["stats"],
        direction["histogram"],
        direction["top_positive"][0],
        direction["quantile_samples"][0],
        direction["position_profile"],
        direction["logit_effects"],
        direction["top_tokens"][0],
        data["cross_layer_cosine"],
        next(iter(data["examples"].values())),
    ):
        where["a_later_analysis"] = {"anything": [1, "two", None]}
    validate(data)


def test_fields_optional_by_nature_may_be_absent():
    data = synthetic()
    del data["examples"]  # only with --store-sequences
    for ref in iter_directions(data):
        for key in ("top_tokens", "bottom_tokens", "logit_effects"):
            ref.direction.pop(key, None)
        for example in iter_examples(ref.direction):
            example.pop("sibling_activations")
    validate(data)


def test_null_is_accepted_where_a_value_was_not_finite():
    data = synthetic()
    example = data["layers"][0]["projections"]["gate_proj"]["directions"][0]["top_positive"][0]
    j = 0 if example["target"] else 1
    example["activations"][j] = None
    example["sibling_activations"]["up_proj"][j] = None
    data["layers"][0]["projections"]["gate_proj"]["directions"][0]["position_profile"]["mean"][
        -1
    ] = None
    data["metadata"]["max_length"] = None
    validate(data)


GATE = "layers[1].projections.gate_proj.directions[0]"
UP = "layers[0].projections.up_proj.directions[1]"


def gate(data: dict) -> dict:
    return data["layers"][1]["projections"]["gate_proj"]["directions"][0]


def up(data: dict) -> dict:
    return data["layers"][0]["projections"]["up_proj"]["directions"][1]


def first_example(data: dict) -> dict:
    return gate(data)["top_positive"][0]


def set_in(getter: Callable[[dict], dict], key: str, value: object) -> Callable[[dict], None]:
    def mutate(data: dict) -> None:
        getter(data)[key] = value

    return mutate


def delete(getter: Callable[[dict], dict], key: str) -> Callable[[dict], None]:
    def mutate(data: dict) -> None:
        del getter(data)[key]

    return mutate


def metadata(data: dict) -> dict:
    return data["metadata"]


def stats(data: dict) -> dict:
    return gate(data)["stats"]


def drop_last(getter: Callable[[dict], list]) -> Callable[[dict], None]:
    def mutate(data: dict) -> None:
        getter(data).pop()

    return mutate


def target_past_token_index(data: dict) -> None:
    example = first_example(data)
    assert example["target"] == 3  # the whole window before it: the mutation below can break it
    example["token_index"] = 2


def activation_not_at_target(data: dict) -> None:
    example = first_example(data)
    example["activation"] = example["activation"] + 1.0


def stranger_sibling(data: dict) -> None:
    example = first_example(data)
    example["sibling_activations"]["o_proj"] = [0.0] * len(example["tokens"])


def non_square(data: dict) -> None:
    data["layers"][0]["cosine_similarities"][0]["matrix"].pop()


def ragged(data: dict) -> None:
    data["layers"][0]["cosine_similarities"][0]["matrix"][1].pop()


def cross_layer_label(data: dict) -> None:
    data["cross_layer_cosine"]["labels"].append("L9.gate_proj.A[0]")


def quantiles_past_one(data: dict) -> None:
    gate(data)["quantile_samples"][0]["quantile_range"] = [0.5, 1.5]


def values_reversed(data: dict) -> None:
    gate(data)["quantile_samples"][1]["value_range"].reverse()


def one_more_direction_than_rank(data: dict) -> None:
    projection = data["layers"][1]["projections"]["gate_proj"]
    projection["directions"].append(copy.deepcopy(projection["directions"][0]))


def components_swapped(data: dict) -> None:
    directions = data["layers"][0]["projections"]["up_proj"]["directions"]
    directions.reverse()


def logit_effects_on_gate(data: dict) -> None:
    gate(data)["logit_effects"] = {"top": [], "bottom": []}


def logit_value(data: dict) -> None:
    data["layers"][1]["projections"]["down_proj"]["directions"][0]["logit_effects"]["top"][0][
        "value"
    ] = "x"


def example_key(data: dict) -> None:
    data["examples"]["-1"] = {"tokens": [], "source": ""}


def example_tokens(data: dict) -> None:
    data["examples"]["7"] = {"tokens": ["a", 5], "source": ""}


def token_row_count(data: dict) -> None:
    up(data)["top_tokens"][0]["count"] = 0


def deep_token(data: dict) -> None:
    gate(data)["quantile_samples"][2]["examples"][0]["tokens"][0] = None


DIRECTION_OF_LAYER1_DOWN = "layers[1].projections.down_proj.directions[0]"
# (what breaks, how, the start of the message: the path of the bad field and what is wrong)
MUTATIONS = [
    ("schema_version", set_in(lambda d: d, "schema_version", 2), "schema_version: expected 1"),
    ("metadata missing", delete(metadata, "num_tokens"), "metadata.num_tokens: missing"),
    (
        "metadata type",
        set_in(metadata, "top_k", "16"),
        'metadata.top_k: expected a positive integer, got "16"',
    ),
    (
        "created_at",
        set_in(metadata, "created_at", "yesterday"),
        "metadata.created_at: expected an ISO 8601 time",
    ),
    ("max_length", set_in(metadata, "max_length", 0), "metadata.max_length: expected a positive"),
    ("lora_layers", set_in(metadata, "lora_layers", [0, 2]), "metadata.lora_layers: expected"),
    ("modules", set_in(metadata, "modules", ["gate_proj"]), "metadata.modules: expected"),
    (
        "integer",
        set_in(stats, "count", "x"),
        f'{GATE}.stats.count: expected a non-negative integer, got "x"',
    ),
    ("bool", set_in(stats, "nonfinite", True), f"{GATE}.stats.nonfinite: expected a non-negative"),
    (
        "NaN",
        set_in(stats, "mean", float("nan")),
        f"{GATE}.stats.mean: expected a finite number, got NaN",
    ),
    ("stats missing", delete(stats, "nonfinite"), f"{GATE}.stats.nonfinite: missing"),
    (
        "direction missing",
        delete(gate, "write_norm_scale"),
        f"{GATE}.write_norm_scale: missing",
    ),
    ("samples missing", delete(gate, "quantile_samples"), f"{GATE}.quantile_samples: missing"),
    (
        "histogram edges",
        drop_last(lambda d: gate(d)["histogram"]["edges"]),
        f"{GATE}.histogram.edges: expected 11 entries (counts + 1), got 10",
    ),
    (
        "histogram bins",
        set_in(metadata, "histogram_bins", 11),
        "layers[0].projections.gate_proj.directions[0].histogram.counts: expected 11 entries",
    ),
    (
        "histogram sum",
        set_in(stats, "count", 1),
        f"{GATE}.histogram.counts: expected a sum of stats.count 1",
    ),
    (
        "target",
        lambda d: first_example(d).update(target=len(first_example(d)["tokens"])),
        f"{GATE}.top_positive[0].target: expected an index into its",
    ),
    (
        "target and token_index",
        target_past_token_index,
        f"{GATE}.top_positive[0].target: expected at most token_index 2",
    ),
    (
        "activations",
        drop_last(lambda d: first_example(d)["activations"]),
        f"{GATE}.top_positive[0].activations: expected",
    ),
    (
        "activation",
        activation_not_at_target,
        f"{GATE}.top_positive[0].activation: expected activations[target]",
    ),
    (
        "sibling length",
        drop_last(lambda d: first_example(d)["sibling_activations"]["up_proj"]),
        f"{GATE}.top_positive[0].sibling_activations.up_proj: expected",
    ),
    (
        "sibling module",
        stranger_sibling,
        f"{GATE}.top_positive[0].sibling_activations: expected other modules of its layer",
    ),
    (
        "context window",
        set_in(metadata, "context_window", 0),
        "layers[0].projections.gate_proj.directions[0].top_positive[0].tokens: expected at most 1",
    ),
    (
        "top_k",
        set_in(metadata, "top_k", 1),
        "layers[0].projections.gate_proj.directions[0].top_positive: expected at most 1",
    ),
    (
        "cosine rows",
        non_square,
        "layers[0].cosine_similarities[0].matrix: expected 6 rows (labels), got 5",
    ),
    ("cosine row", ragged, "layers[0].cosine_similarities[0].matrix[1]: expected 6 entries"),
    ("cross-layer", cross_layer_label, "cross_layer_cosine.matrix: expected"),
    (
        "quantile range",
        quantiles_past_one,
        f"{GATE}.quantile_samples[0].quantile_range: expected a range [lo, hi] with lo <= hi "
        "inside [0, 1]",
    ),
    ("value range", values_reversed, f"{GATE}.quantile_samples[1].value_range: expected a range"),
    (
        "position edges",
        drop_last(lambda d: gate(d)["position_profile"]["edges"]),
        f"{GATE}.position_profile.edges: expected",
    ),
    (
        "position count",
        drop_last(lambda d: gate(d)["position_profile"]["count"]),
        f"{GATE}.position_profile.count: expected",
    ),
    (
        "rank",
        one_more_direction_than_rank,
        "layers[1].projections.gate_proj.directions: expected 2 entries (rank), got 3",
    ),
    (
        "component",
        components_swapped,
        "layers[0].projections.up_proj.directions[0].component: expected 0, got 1",
    ),
    ("logit effects", logit_effects_on_gate, f"{GATE}.logit_effects: unexpected"),
    ("logit value", logit_value, f"{DIRECTION_OF_LAYER1_DOWN}.logit_effects.top[0].value"),
    ("token row", token_row_count, f"{UP}.top_tokens[0].count: expected a positive integer"),
    (
        "deep list entry",
        deep_token,
        f"{GATE}.quantile_samples[2].examples[0].tokens[0]: expected a string, got null",
    ),
    ("examples key", example_key, 'examples["-1"]: expected a key that is an example index'),
    (
        "examples key type",
        lambda d: d["examples"].update({12: {"tokens": [], "source": ""}}),
        "examples[12]: expected a key that is an example index, got 12",
    ),
    ("examples tokens", example_tokens, 'examples["7"].tokens[1]: expected a string, got 5'),
    (
        "object",
        set_in(lambda d: d["layers"][0], "projections", []),
        "layers[0].projections: expected an object, got []",
    ),
    ("list", set_in(lambda d: d, "layers", {}), "layers: expected a list, got {}"),
]


@pytest.mark.parametrize(
    ("mutate", "message"), [m[1:] for m in MUTATIONS], ids=[m[0] for m in MUTATIONS]
)
def test_each_break_is_named_by_its_path(mutate, message):
    data = synthetic()
    mutate(data)
    with pytest.raises(ContractError) as raised:
        validate(data)
    assert str(raised.value).startswith(message), str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_document_that_is_not_an_object():
    with pytest.raises(ContractError, match=r"^the document: expected an object, got \[\]$"):
        validate([])


def test_the_writer_refuses_an_invalid_document(tmp_path):
    data = synthetic()
    set_in(stats, "count", "x")(data)
    out = tmp_path / "out.json"
    with pytest.raises(
        ContractError, match=rf"^{out} not written.*: {re.escape(GATE)}\.stats\.count"
    ):
        write_json_atomic(data, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_the_dashboard_names_the_first_bad_field_in_one_line(tmp_path, capsys):
    data = synthetic()
    stats(data)["count"] = "x"
    path = tmp_path / "in.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    out = tmp_path / "out.html"
    assert dashboard.main(["--data", str(path), "--output", str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f'error: {path}: {GATE}.stats.count: expected a non-negative integer, got "x"\n'
    )
    assert not out.exists()


def test_the_doc_and_the_code_name_the_same_fields():
    """docs/data-format.md's tables and contract.py's specs cannot drift apart: every field the
    code checks is defined in the doc, and every field a table of the doc defines is checked."""
    specs = [spec for spec in vars(contract).values() if isinstance(spec, contract.Obj)]
    checked = {key for spec in specs for key in (*spec.fields, *spec.optional)}
    doc = (ROOT / "docs" / "data-format.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (`[^|]+`) \|", doc, re.MULTILINE)
    defined = {name for row in rows for name in re.findall(r"`(\w+)`", row)}
    assert defined <= checked, defined - checked
    backticked = set(re.findall(r"`(\w+)`", doc))
    assert checked <= backticked, checked - backticked


# ---- explanations and baseline neurons (--explain, --baseline-neurons) -------------------


def explained() -> dict:
    """The synthetic file with scored explanations and 2 baseline neurons per layer."""
    data = make_activations(
        modules=("gate_proj", "up_proj", "down_proj"), explanations=True, baseline_neurons=2
    )
    data["examples"] = {}
    return data


def test_explanations_and_baseline_neurons_are_valid():
    data = explained()
    validate(data)
    assert_consistent(data)
    assert len(data["baseline_neurons"]) == 4
    features = [ref.direction for ref in iter_directions(data)] + data["baseline_neurons"]
    assert all(set(f["explanations"]) == {"positive", "negative"} for f in features)
    assert {"neurons", "lora_minus_neurons"} <= set(data["explanations"]["summary"])


def test_what_explaining_leaves_optional_may_be_absent():
    data = explained()
    gate(data)["explanations"].pop("negative")  # a sign without examples
    del data["explanations"]["settings"]
    del data["explanations"]["summary"]["neurons"]
    del data["explanations"]["summary"]["lora_minus_neurons"]
    for neuron in data["baseline_neurons"]:
        for key in ("explanations", "top_tokens", "bottom_tokens"):
            del neuron[key]
    gate(data)["explanations"]["positive"]["detection"].pop("auroc")
    validate(data)
    del data["baseline_neurons"]
    validate(data)


def positive(data: dict) -> dict:
    return gate(data)["explanations"]["positive"]


def detection(data: dict) -> dict:
    return positive(data)["detection"]


def summary(data: dict) -> dict:
    return data["explanations"]["summary"]


def neuron(data: dict) -> dict:
    return data["baseline_neurons"][1]


EXPLAINED = f"{GATE}.explanations.positive"
EXPLANATION_MUTATIONS = [
    ("score above 1", set_in(detection, "score", 1.5), f"{EXPLAINED}.detection.score: expected a"),
    (
        "interval reversed",
        lambda d: detection(d).update(score=0.3, ci=[0.5, 0.1]),
        f"{EXPLAINED}.detection.ci: expected a range [lo, hi] inside [0, 1], got [0.5, 0.1]",
    ),
    (
        "interval without a score",
        lambda d: detection(d).update(score=None, ci=[0.1, 0.5]),
        f"{EXPLAINED}.detection.ci: expected null where score is null",
    ),
    (
        "interval of three",
        set_in(detection, "ci", [0.1, 0.2, 0.3]),
        f"{EXPLAINED}.detection.ci: expected a pair of finite numbers or null",
    ),
    ("n", set_in(detection, "n", -1), f"{EXPLAINED}.detection.n: expected a non-negative"),
    ("auroc", set_in(detection, "auroc", 2), f"{EXPLAINED}.detection.auroc: expected a value"),
    ("text", delete(positive, "text"), f"{EXPLAINED}.text: missing"),
    (
        "shuffled",
        delete(lambda d: positive(d)["shuffled"], "fuzzing"),
        f"{EXPLAINED}.shuffled.fuzzing: missing",
    ),
    (
        "explained without explaining",
        lambda d: d.pop("explanations"),
        "layers[0].projections.gate_proj.directions[0].explanations: unexpected: the document "
        "has no top-level explanations",
    ),
    (
        "seconds",
        set_in(lambda d: d["explanations"], "seconds", -1),
        "explanations.seconds: expected a non-negative number",
    ),
    (
        "group mean",
        set_in(lambda d: summary(d)["lora"]["fuzzing"], "mean", -0.1),
        "explanations.summary.lora.fuzzing.mean: expected a value inside [0, 1]",
    ),
    (
        "difference",
        lambda d: summary(d)["lora_minus_neurons"]["detection"].update(mean=0.2, ci=[-1.5, 0.1]),
        "explanations.summary.lora_minus_neurons.detection.ci: expected a range [lo, hi] inside "
        "[-1, 1], got [-1.5, 0.1]",
    ),
    (
        "difference without neurons",
        lambda d: summary(d).pop("neurons"),
        "explanations.summary.lora_minus_neurons: expected exactly where neurons is",
    ),
    (
        "neurons without baseline neurons",
        lambda d: d.pop("baseline_neurons"),
        "explanations.summary.neurons: unexpected: the document has no baseline_neurons",
    ),
    (
        "settings",
        set_in(lambda d: d["explanations"]["settings"], "contexts_per_class", 0),
        "explanations.settings.contexts_per_class: expected a positive integer",
    ),
    ("neuron index", set_in(neuron, "neuron", "7"), "baseline_neurons[1].neuron: expected a"),
    (
        "neuron twice",
        lambda d: d["baseline_neurons"].insert(1, copy.deepcopy(neuron(d))),
        "baseline_neurons[2]: expected after the neuron before it, by layer, then neuron",
    ),
    (
        "neurons out of order",
        lambda d: d["baseline_neurons"].reverse(),
        "baseline_neurons[1]: expected after the neuron before it",
    ),
    (
        "neuron layer",
        set_in(neuron, "layer", 5),
        "baseline_neurons[1].layer: expected an adapted layer [0, 1]",
    ),
    (
        "neuron histogram",
        set_in(lambda d: neuron(d)["stats"], "count", 1),
        "baseline_neurons[1].histogram.counts: expected a sum of stats.count 1",
    ),
    (
        "neuron context",
        lambda d: neuron(d)["top_negative"][0]["tokens"].append("x"),
        "baseline_neurons[1].top_negative[0].activations: expected",
    ),
    (
        "neuron score",
        set_in(lambda d: neuron(d)["explanations"]["negative"]["fuzzing"], "score", 2),
        "baseline_neurons[1].explanations.negative.fuzzing.score: expected a value inside",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [m[1:] for m in EXPLANATION_MUTATIONS],
    ids=[m[0] for m in EXPLANATION_MUTATIONS],
)
def test_each_break_of_the_explanations_is_named_by_its_path(mutate, message):
    data = explained()
    mutate(data)
    with pytest.raises(ContractError) as raised:
        validate(data)
    assert str(raised.value).startswith(message), str(raised.value)


def test_a_baseline_neuron_past_top_k_or_the_window_is_refused():
    data = explained()
    for direction in (ref.direction for ref in iter_directions(data)):
        del direction["top_positive"][1:], direction["top_negative"][1:]
    data["metadata"]["top_k"] = 1
    with pytest.raises(ContractError, match=r"^baseline_neurons\[0\]\.top_positive: expected at"):
        validate(data)
    data = explained()
    data["metadata"]["context_window"] = 0
    for example in (e for ref in iter_directions(data) for e in iter_examples(ref.direction)):
        for key in ("tokens", "activations"):
            example[key] = example[key][example["target"] : example["target"] + 1]
        for module in example["sibling_activations"]:
            example["sibling_activations"][module] = [example["activation"]]
        example["target"] = 0
    with pytest.raises(ContractError, match=r"^baseline_neurons\[0\]\.top_positive\[0\]\.tokens"):
        validate(data)
