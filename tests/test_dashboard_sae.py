"""The SAE section of --sae (issue 14, items 6 and 7): its contract, what the page embeds of it,
and the page's Features view in Chromium."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from backend.contract import ContractError, example_holders, iter_examples, validate
from backend.output import examples_shown
from tests.synthetic import make_activations

ALL_MODULES = ("gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj")


def with_sae(**kwargs) -> dict:
    """Five layers of the MLP and o_proj (20 directions), 80 features (2 dead latents),
    explained."""
    args = {"n_layers": 5, "modules": ("gate_proj", "up_proj", "down_proj", "o_proj"), "sae": 80}
    args |= kwargs
    return make_activations(explanations=True, **args)


# ---- the contract -------------------------------------------------------------------------


def test_a_file_with_an_sae_is_valid_and_its_features_hold_examples():
    data = with_sae()
    validate(data)
    sae = data["sae"]
    assert len(sae["features"]) == 80 and sae["dead"] == [39, 79] and sae["num_latents"] == 82
    assert sum(1 for f in sae["features"] if "explanations" in f) == 32
    # The writer's occurrence counting and the page's sequences see the features' examples.
    features = list(example_holders(data))[-80:]
    assert features == sae["features"]
    shown = {e["example_index"] for f in features for e in iter_examples(f)}
    assert shown and shown <= examples_shown(data)
    assert all(len(list(iter_examples(f))) == 4 + 5 * 2 for f in features)  # k + ranges × 2


def feature(i: int = 0) -> Callable[[dict], dict]:
    return lambda data: data["sae"]["features"][i]


def sae(data: dict) -> dict:
    return data["sae"]


def set_in(get: Callable[[dict], dict], key: str, value: object) -> Callable[[dict], None]:
    return lambda data: get(data).__setitem__(key, value)


def swap_features(data: dict) -> None:
    features = data["sae"]["features"]
    features[0], features[1] = features[1], features[0]


def unsorted_composition(data: dict) -> None:
    composition = feature()(data)["composition"]
    composition[0], composition[1] = composition[1], composition[0]


def stranger_in_composition(data: dict) -> None:
    feature()(data)["composition"][3]["layer"] = 7


def negative_sample(data: dict) -> None:
    feature(2)(data)["quantile_samples"][1]["sign"] = -1


def bad_count(data: dict) -> None:
    stats = feature(1)(data)["stats"]
    stats["count"] -= 1
    feature(1)(data)["histogram"]["counts"][0] -= 1


def negative_explanation(data: dict) -> None:
    explained = next(f for f in data["sae"]["features"] if "explanations" in f)
    explained["explanations"]["negative"] = explained["explanations"]["positive"]


def siblings(data: dict) -> None:
    example = feature()(data)["top_positive"][0]
    example["sibling_activations"] = {"up_proj": [0.0] * len(example["tokens"])}


def shares(data: dict) -> None:
    data["sae"]["error_share"]["gate_proj"] += 0.5


def twice(data: dict) -> None:
    composition = feature(6)(data)["composition"]
    composition[1] = dict(composition[0])


def one_bin(data: dict) -> None:
    feature(0)(data)["histogram"] = {
        "edges": [0.0, 1.0],
        "counts": [feature(0)(data)["stats"]["count"]],
    }


def explained_index(data: dict) -> int:
    return next(i for i, f in enumerate(data["sae"]["features"]) if "explanations" in f)


SAE_MUTATIONS = [
    ("no sae field", lambda d: d["sae"].pop("fvu"), "sae.fvu: missing"),
    (
        "fraction",
        set_in(sae, "dead_fraction", 1.5),
        "sae.dead_fraction: expected a number inside [0, 1]",
    ),
    (
        "dead fraction",
        set_in(sae, "dead_fraction", 0.5),
        "sae.dead_fraction: expected len(dead) / num_latents",
    ),
    ("k", set_in(sae, "k", 82), "sae.k: expected less than num_latents 82"),
    ("order", swap_features, "sae.features[1].index: expected after"),
    (
        "beyond",
        set_in(feature(79), "index", 82),
        "sae.features[79].index: expected a latent below num_latents 82",
    ),
    (
        "dead and live",
        set_in(sae, "dead", [0, 39]),
        "sae.dead: expected no latent of features, got 0",
    ),
    ("dead order", set_in(sae, "dead", [79, 39]), "sae.dead[1]: expected after 79"),
    ("frequency", set_in(feature(3), "frequency", 0), "sae.features[3].frequency: expected > 0"),
    (
        "negative",
        set_in(lambda d: feature(4)(d)["stats"], "min", -1.0),
        "sae.features[4].stats.min: expected >= 0",
    ),
    ("sign", negative_sample, "sae.features[2].quantile_samples[1].sign: expected 1"),
    (
        "weights",
        unsorted_composition,
        "sae.features[0].composition[1].weight: expected |weight| at most",
    ),
    (
        "composition",
        stranger_in_composition,
        "sae.features[0].composition[3]: expected a direction of the layers",
    ),
    (
        "short composition",
        lambda d: feature(5)(d)["composition"].pop(),
        "sae.features[5].composition: expected 16 entries",
    ),
    ("twice", twice, "sae.features[6].composition: expected each direction once"),
    (
        "counts",
        lambda d: feature(1)(d)["histogram"]["counts"].__setitem__(0, 0),
        "sae.features[1].histogram.counts: expected a sum of stats.count",
    ),
    (
        "tokens counted",
        bad_count,
        "sae.features[1].stats.count: expected count + nonfinite = sae.num_tokens",
    ),
    (
        "example",
        set_in(lambda d: feature(2)(d)["top_positive"][0], "target", 99),
        "sae.features[2].top_positive[0].target: expected an index into",
    ),
    (
        "negative explanation",
        negative_explanation,
        "sae.features[{explained}].explanations.negative: unexpected",
    ),
    (
        "siblings",
        siblings,
        "sae.features[0].top_positive[0].sibling_activations: expected other modules",
    ),
    ("bins", one_bin, "sae.features[0].histogram.counts: expected 10 entries"),
    ("shares", shares, "sae.error_share: expected a sum of 1"),
    (
        "share module",
        lambda d: d["sae"]["error_share"].update(q_proj=0.0),
        "sae.error_share: expected modules of metadata.modules",
    ),
    (
        "training",
        set_in(lambda d: sae(d)["training"], "batch_size", 0),
        "sae.training.batch_size: expected a positive integer",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "message"), [m[1:] for m in SAE_MUTATIONS], ids=[m[0] for m in SAE_MUTATIONS]
)
def test_each_break_of_the_sae_is_named_by_its_path(mutate, message):
    data = with_sae()
    message = message.format(explained=explained_index(data))
    mutate(data)
    with pytest.raises(ContractError) as raised:
        validate(data)
    assert str(raised.value).startswith(message), str(raised.value)
    assert "\n" not in str(raised.value)


def test_an_sae_explanation_needs_the_runs_explaining():
    data = with_sae()
    explanation = feature(explained_index(data))(data)["explanations"]
    del data["explanations"]
    for holder in example_holders(data):
        holder.pop("explanations", None)
    validate(data)  # fine without any
    feature(0)(data)["explanations"] = explanation
    with pytest.raises(ContractError, match=r"^sae\.features\[0\]\.explanations: unexpected"):
        validate(data)
