"""--effects in a whole run: the document's effects against a brute force through PEFT itself
(zeroed lora_B columns, plain forwards, float64 KL; autograd for attribution), the same however
the run is split, and bad input refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from unittest.mock import ANY

import numpy as np
import pytest
import torch

from backend.causal import spearman
from backend.config import RunConfig
from backend.contract import CLAMPS, iter_directions, validate
from backend.data import iter_sequences, read_rows
from backend.directions import find_lora_modules
from backend.generate_activations_data import main
from backend.output import build_document
from backend.pipeline import analyze
from backend.state import load_state
from tests.reference import ablated, brute_attribution, kl_and_dloss, log_probs
from tests.runs import K, W, load, run_cli
from tests.test_scale import SCRIPT, subprocess_env
from tests.tiny import save_adapter

ROWS, CUT = 3, 12
EFFECTS = ["--effects", str(ROWS), "--effects-max-length", str(CUT)]
PINNED = ["--steer-directions", "2", "--steer-prompts", "1"]
REL = 2e-3


@pytest.fixture(scope="module")
def rank2_attention(qwen2_base, tmp_path_factory):
    """Rank 2 on attention and MLP targets, two layers: groups of unequal start layers."""
    path = tmp_path_factory.mktemp("adapter") / "rank2"
    targets = ("gate_proj", "down_proj", "q_proj", "o_proj")
    return save_adapter(qwen2_base, path, rank=2, targets=targets, layers=[1, 2])


def effects_rows(base, adapter, data):
    """The model, its LoRA modules, and the effects' rows: example indices and token ids."""
    model, tokenizer = load(base, adapter)
    sequences = iter_sequences(
        read_rows(data), tokenizer, text_field=None, max_length=None, num_examples=None
    )
    rows = [s for s in sequences if len(s.input_ids) >= 2][:ROWS]
    ids = [torch.tensor(s.input_ids[:CUT]) for s in rows]
    return model, find_lora_modules(model), [s.example_index for s in rows], ids


def keys(modules) -> list[tuple[int, str, int]]:
    """Every direction as (layer, module, component), in `modules` order."""
    return [(m.layer, m.module, c) for m in modules for c in range(m.rank)]


def brute_force(model, modules, rows: list[torch.Tensor]):
    """Per direction, layer and module: (mean KL, mean dloss); and the KL vs the base."""
    positions = sum(len(ids) - 1 for ids in rows)
    groups = {
        ("direction", (m.layer, m.module, c)): {m.name: [c]} for m in modules for c in range(m.rank)
    }
    for kind, key in (("layer", lambda m: m.layer), ("module", lambda m: m.module)):
        for m in modules:
            groups.setdefault((kind, key(m)), {})[m.name] = list(range(m.rank))
    sums = dict.fromkeys(groups, (0.0, 0.0))
    kl_base = []
    for ids in rows:
        with torch.no_grad():
            full = log_probs(model, ids)
            with model.disable_adapter():
                base = log_probs(model, ids)
        kl_base.append((full.exp() * (full - base)).sum(-1).numpy())
        for group, drop in groups.items():
            kl, dloss = kl_and_dloss(full, ablated(model, modules, drop, ids), ids)
            sums[group] = (sums[group][0] + kl, sums[group][1] + dloss)
    means = {group: (kl / positions, dloss / positions) for group, (kl, dloss) in sums.items()}
    return means, kl_base


def by_key(doc: dict) -> dict[tuple[int, str, int], dict]:
    return {(r.layer, r.module, r.component): r.direction for r in iter_directions(doc)}


@pytest.mark.parametrize("adapter", ["rank1_adapter", "rank2_attention"])
def test_effects_equal_a_brute_force_through_peft(
    request, tmp_path, qwen2_base, text_file, adapter
):
    adapter = request.getfixturevalue(adapter)
    doc = run_cli(tmp_path, qwen2_base, adapter, text_file, *EFFECTS, *PINNED)
    validate(doc)
    model, modules, examples, rows = effects_rows(qwen2_base, adapter, text_file)
    directions = by_key(doc)
    assert sorted(directions) == sorted(keys(modules))
    means, kl_base = brute_force(model, modules, rows)
    effects = doc["effects"]
    assert effects["num_examples"] == ROWS
    assert effects["num_tokens"] == sum(len(ids) - 1 for ids in rows)
    assert effects["kl_vs_base"] == pytest.approx(np.concatenate(kl_base).mean(), rel=REL)
    assert list(effects["kl_tokens"]) == [str(i) for i in examples]
    for values, expected in zip(effects["kl_tokens"].values(), kl_base, strict=True):
        assert values == pytest.approx(expected, rel=REL, abs=1e-9)
    for key, direction in directions.items():
        got = direction["effects"]
        assert (got["ablation_kl"], got["ablation_dloss"]) == pytest.approx(
            means["direction", key], rel=REL, abs=1e-9
        )
    for group in effects["layers"]:
        want = means["layer", group["layer"]]
        assert (group["ablation_kl"], group["ablation_dloss"]) == pytest.approx(want, rel=REL)
    for group in effects["modules"]:
        want = means["module", group["module"]]
        assert (group["ablation_kl"], group["ablation_dloss"]) == pytest.approx(want, rel=REL)


def test_attribution_equals_autograd_and_keeps_distinct_windows(
    tmp_path, qwen2_base, rank1_adapter, text_file
):
    doc = run_cli(tmp_path, qwen2_base, rank1_adapter, text_file, *EFFECTS, *PINNED)
    model, modules, examples, rows = effects_rows(qwen2_base, rank1_adapter, text_file)
    first = {m.name: i for i, m in enumerate(modules)}  # rank 1: a row per module
    attrs = [
        dict(zip(keys(modules), brute_attribution(model, modules, first, ids), strict=True))
        for ids in rows
    ]
    positions = sum(len(ids) - 1 for ids in rows)
    for key, direction in by_key(doc).items():
        got = direction["effects"]
        total = sum(float(a[key].sum()) for a in attrs)
        assert got["attribution"] == pytest.approx(total / positions, rel=REL, abs=1e-9)
        # Every token of the effects' rows, by attr: the lists are its best distinct windows.
        tokens = [
            (float(a[key][t]), examples[r], t)
            for r, a in enumerate(attrs)
            for t in range(len(rows[r]))
        ]
        for side, sign in (("top_attribution", 1), ("bottom_attribution", -1)):
            shown = got[side]
            assert len(shown) <= K
            windows = {(tuple(e["tokens"]), e["target"]) for e in shown}
            assert len(windows) == len(shown)
            for e in shown:
                r = examples.index(e["example_index"])
                attr = attrs[r][key]
                assert e["attribution"] == pytest.approx(attr[e["token_index"]], rel=REL, abs=1e-7)
                assert e["attribution"] * sign > 0
                first = e["token_index"] - e["target"]
                want = attr[first : first + len(e["tokens"])]
                assert e["attributions"] == pytest.approx(want, rel=REL, abs=1e-7)
            best = sorted((sign * v for v, _, _ in tokens), reverse=True)[0]
            if shown:
                assert shown[0]["attribution"] * sign == pytest.approx(best, rel=REL)


def test_pinned_samples_hold_the_observed_extremes(tmp_path, qwen2_base, rank1_adapter, text_file):
    doc = run_cli(tmp_path, qwen2_base, rank1_adapter, text_file, *EFFECTS, *PINNED)
    steering = doc["effects"]["steering"]
    assert len(steering) == 2 * 1 * len(CLAMPS)
    directions = by_key(doc)
    ranked = sorted(directions, key=lambda k: -directions[k]["effects"]["ablation_kl"])[:2]
    assert [(s["layer"], s["module"], s["component"]) for s in steering[:: len(CLAMPS)]] == ranked
    for s in steering:
        stats = directions[s["layer"], s["module"], s["component"]]["stats"]
        want = {"min": stats["min"], "zero": 0.0, "max": stats["max"], "none": None}
        assert s["value"] == want[s["clamp"]]
        assert 0 < len(s["tokens"]) <= 48
    assert doc["effects"]["prompts"][0]["example_index"] == int(
        next(iter(doc["effects"]["kl_tokens"]))
    )


def effects_only(doc: dict) -> tuple:
    """What the effects found, for comparing splits: floats to 1e-9 relative."""
    effects = json.loads(json.dumps(doc["effects"]))  # a copy
    per_direction = [r.direction["effects"] for r in iter_directions(doc)]
    return effects, per_direction


def assert_same_effects(a: dict, b: dict) -> None:
    (ea, da), (eb, db) = effects_only(a), effects_only(b)
    assert ea["prompts"] == eb["prompts"]
    # the values held are observed extremes: activations, which may round differently
    values = [[s.pop("value") or 0.0 for s in e["steering"]] for e in (ea, eb)]
    assert values[0] == pytest.approx(values[1], rel=1e-6)
    assert ea["steering"] == eb["steering"]
    assert list(ea["kl_tokens"]) == list(eb["kl_tokens"])
    for key in ("num_examples", "num_tokens", "max_length"):
        assert ea[key] == eb[key]
    for key in ("kl_vs_base", "attribution_spearman"):
        assert ea[key] == pytest.approx(eb[key], rel=1e-9)
    for x, y in zip(da, db, strict=True):
        for key in ("ablation_kl", "ablation_dloss", "attribution"):
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-12)
        for side in ("top_attribution", "bottom_attribution"):
            assert [(e["example_index"], e["token_index"], e["occurrences"]) for e in x[side]] == [
                (e["example_index"], e["token_index"], e["occurrences"]) for e in y[side]
            ]


def test_effects_are_the_same_however_the_run_is_split(
    tmp_path, qwen2_base, rank1_adapter, text_file
):
    whole = run_cli(tmp_path, qwen2_base, rank1_adapter, text_file, *EFFECTS, *PINNED)
    common = ["--base-model", str(qwen2_base), "--lora-path", str(rank1_adapter)]
    common += ["--data-file", str(text_file), "--top-k", str(K), "--context-window", str(W)]
    common += [*EFFECTS, *PINNED, "--quiet"]
    shards = [tmp_path / f"shard{i}.pt" for i in range(2)]
    for i, shard in enumerate(shards):
        assert main([*common, "--shard", f"{i}/2", "--output", str(shard)]) == 0
    merged = tmp_path / "merged.json"
    assert main(["merge", str(merged), *map(str, shards)]) == 0
    assert_same_effects(whole, json.loads(merged.read_text()))
    batched = run_cli(
        tmp_path, qwen2_base, rank1_adapter, text_file, *EFFECTS, *PINNED, "--max-batch-tokens", "7"
    )
    assert_same_effects(whole, batched)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--effects", "30"], "error: --effects 30: the run reads only 24 rows"),
        (
            ["--effects", "3", "--num-examples", "2"],
            "error: --effects 3: the run reads only 2 rows",
        ),
        (["--effects-max-length", "1"], "--effects-max-length: must be at least 2"),
        (["--effects", "-1"], "--effects: must not be negative"),
    ],
)
def test_bad_effects_options_get_one_line(
    tmp_path, qwen2_base, rank1_adapter, text_file, capsys, argv, message
):
    out = tmp_path / "out.json"
    base = ["--base-model", str(qwen2_base), "--lora-path", str(rank1_adapter)]
    base += ["--data-file", str(text_file), "--output", str(out), "--quiet"]
    try:
        code = main([*base, *argv])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    assert code != 0
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert not out.exists()


def test_too_few_rows_with_two_tokens(tmp_path, qwen2_base, rank1_adapter, capsys):
    data = tmp_path / "short.jsonl"
    data.write_text(
        "".join(json.dumps({"input_ids": ids}) + "\n" for ids in ([5, 6, 7], [8], [9, 10]))
    )
    out = tmp_path / "out.json"
    argv = ["--base-model", str(qwen2_base), "--lora-path", str(rank1_adapter)]
    argv += ["--data-file", str(data), "--output", str(out), "--quiet", "--effects", "3"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        "error: --effects 3: the data has only 2 rows with at least 2 tokens "
        "(within --num-examples)"
    )
    assert not out.exists()


class BreaksInTheEffects:
    """The rows, whose second reading (the effects' rows, after the pass) breaks after
    `rows` rows: a run killed during its effects, its checkpoint left behind."""

    def __init__(self, rows: list, after: int) -> None:
        self.rows, self.after, self.readings = rows, after, 0

    def __iter__(self):
        self.readings += 1
        if self.readings != 2:
            yield from self.rows
            return
        yield from self.rows[: self.after]
        raise RuntimeError("killed")


def test_a_run_killed_in_its_effects_resumes_to_the_same_result(
    tmp_path, qwen2_base, rank1_adapter, text_file
):
    model, tokenizer = load(qwen2_base, rank1_adapter)
    rows = list(read_rows(text_file))
    config = RunConfig(
        base_model=str(qwen2_base), lora_path=str(rank1_adapter), data_file=text_file,
        num_examples=None, top_k=K, context_window=W, effects=ROWS, effects_max_length=CUT,
        steer_directions=1, steer_prompts=1, checkpoint_every=(1, None), resume=True,
    )  # fmt: skip
    unbroken = build_document(analyze(model, tokenizer, rows, config))
    checkpoint = tmp_path / "run.ckpt"
    with pytest.raises(RuntimeError, match="killed"):
        analyze(model, tokenizer, BreaksInTheEffects(rows, 2), config, checkpoint=checkpoint)
    assert load_state(checkpoint).effects.rows_done == 2  # the pass done, two rows of effects
    resumed = build_document(analyze(model, tokenizer, rows, config, checkpoint=checkpoint))
    assert_same_effects(unbroken, resumed)
    assert resumed["metadata"] == {**unbroken["metadata"], "created_at": ANY}


def test_two_processes_give_the_effects_of_one(tmp_path, qwen2_base, rank1_adapter, text_file):
    whole = run_cli(tmp_path, qwen2_base, rank1_adapter, text_file, *EFFECTS, *PINNED)
    out = tmp_path / "two.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", "29541", SCRIPT, "--base-model", str(qwen2_base),
               "--lora-path", str(rank1_adapter), "--data-file", str(text_file),
               "--top-k", str(K), "--context-window", str(W), *EFFECTS, *PINNED,
               "--output", str(out), "--quiet", "--device", "cpu"]  # fmt: skip
    done = subprocess.run(
        command, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["metadata"]["num_processes"] == 2
    assert_same_effects(whole, doc)


def brute_spearman(a: list[float], b: list[float]) -> float:
    """Pearson's correlation of the ranks, each rank by its definition: 1 + the values below it
    + half the others equal to it."""

    def ranks(x: list[float]) -> np.ndarray:
        return np.array([1 + sum(y < v for y in x) + (sum(y == v for y in x) - 1) / 2 for v in x])

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def test_attribution_spearman_is_the_rank_correlation(tmp_path, qwen2_base, text_file, request):
    adapter = request.getfixturevalue("rank2_attention")
    doc = run_cli(tmp_path, qwen2_base, adapter, text_file, *EFFECTS, "--steer-directions", "0")
    found = [r.direction["effects"] for r in iter_directions(doc)]
    want = brute_spearman([e["attribution"] for e in found], [e["ablation_dloss"] for e in found])
    assert doc["effects"]["attribution_spearman"] == pytest.approx(want, rel=1e-12)
    assert doc["effects"]["steering"] == [] and doc["effects"]["prompts"] == []
    # ties share the mean of their ranks; fewer than 3 directions, or a constant side: null
    a, b = [1.0, 1.0, 2.0, 3.0, 3.0], [0.5, 2.0, 1.0, 4.0, 4.0]
    assert spearman(torch.tensor(a), torch.tensor(b)) == pytest.approx(brute_spearman(a, b))
    assert spearman(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 1.0])) is None
    assert spearman(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.0, 2.0, 3.0])) is None
