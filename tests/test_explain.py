"""Explaining and scoring (issue 13) end to end: a tiny real model explains and scores through
the run's --explain and the standalone step; a real chat server on 127.0.0.1 does through an
endpoint; reruns come from the cache; bad input is one line."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time

import pytest

import backend.explain_directions as standalone
from backend.chat import LocalChat
from backend.contract import SIGNS, feature_key, iter_directions, iter_features, neuron_key
from backend.explain import SIGN_OF, Settings, _questions, _score
from backend.features import feature
from backend.generate_activations_data import main
from tests.chat_server import Server
from tests.runs import SCRIPT, K, W, load, run_cli, subprocess_env

EXPLAIN = ["--explain", "--baseline-neurons", "2", "--explain-contexts", "4"]
EXPLAIN += ["--explain-context-tokens", "2"]
SAE = ["--sae", "--sae-latents", "12", "--sae-k", "2"]  # and its 3 most frequent features
EXPLAIN += [*SAE, "--explain-features", "3"]


def features_of(doc: dict) -> list[tuple[str, dict, str]]:
    """(key, direction or neuron, sign) of every explained feature."""
    items = [(ref.key, ref.direction) for ref in iter_directions(doc)]
    items += [(neuron_key(n["layer"], n["neuron"]), n) for n in doc["baseline_neurons"]]
    items += [(feature_key(f["index"]), f) for f in iter_features(doc)]
    return [(key, item, sign) for key, item in items for sign in item.get("explanations", {})]


def without_time(doc: dict) -> dict:
    doc = copy.deepcopy(doc)
    del doc["metadata"]["created_at"], doc["explanations"]["seconds"]
    del doc["sae"]["training"]["seconds"]
    return doc


@pytest.fixture(scope="module")
def explained(tmp_path_factory, qwen2_base, rank1_adapter, text_file):
    tmp = tmp_path_factory.mktemp("explained")
    doc = run_cli(tmp, qwen2_base, rank1_adapter, text_file, *EXPLAIN)
    return tmp, doc


def test_every_direction_and_neuron_sign_is_explained_and_scored(explained, qwen2_base):
    _, doc = explained
    top = {"positive": "top_positive", "negative": "top_negative"}
    items = [ref.direction for ref in iter_directions(doc)] + doc["baseline_neurons"]
    assert len(doc["baseline_neurons"]) == 2 * len(doc["layers"])
    for item in items:
        assert set(item["explanations"]) == {s for s in SIGNS if item[top[s]]}
        for entry in item["explanations"].values():
            assert isinstance(entry["text"], str)
            for kind in ("detection", "fuzzing"):
                assert entry[kind]["n"] > 0 or entry[kind]["score"] is None
    lora = [ref.direction for ref in iter_directions(doc)]
    assert all("shuffled" in e for d in lora for e in d["explanations"].values())
    assert not any(
        "shuffled" in e for n in doc["baseline_neurons"] for e in n["explanations"].values()
    )
    run = doc["explanations"]
    assert run["explainer"] == run["scorer"] == str(qwen2_base)
    assert run["settings"] == {
        "contexts_per_class": 4,
        "context_tokens": 2,
        "bootstrap_resamples": 1000,
        "seed": 0,
    }
    assert set(run["summary"]) == {"lora", "neurons", "shuffled", "lora_minus_neurons", "sae"}
    features = features_of(doc)
    # One explanation per feature, then every detection and fuzzing question, own and shuffled.
    questions = sum(
        entry[kind]["n"] + entry.get("shuffled", {}).get(kind, {"n": 0})["n"]
        for _, item, sign in features
        for entry in [item["explanations"][sign]]
        for kind in ("detection", "fuzzing")
    )
    assert run["num_prompts"] == len(features) + questions
    assert run["num_tokens"] > run["num_prompts"]


def test_the_scores_are_what_the_scorer_says_of_the_prompts(explained, qwen2_base, rank1_adapter):
    """Brute force through the pieces: the written explanation, the held-out contexts asked
    again of the base model (adapter disabled) with no cache, scored by definition."""
    _, doc = explained
    model, tokenizer = load(qwen2_base, rank1_adapter)
    chat = LocalChat(model, tokenizer, str(qwen2_base), 4096, reuse_prefix=False)
    settings = Settings(contexts_per_class=4, context_tokens=2)
    checked = 0
    for key, item, sign in features_of(doc)[:6]:
        entry = item["explanations"][sign]
        f = feature(item, key, SIGN_OF[sign], 4)
        asked = _questions(f, "own", entry["text"], settings)
        judged = chat.judge([q.messages for q in asked])
        for kind in ("detection", "fuzzing"):
            pairs = [(q, j) for q, j in zip(asked, judged, strict=True) if q.kind == kind]
            qs, js = [q for q, _ in pairs], [j for _, j in pairs]
            positives = [j.answer for q, j in pairs if q.label]
            negatives = [j.answer for q, j in pairs if not q.label]
            rates = [sum(a is True for a in positives) / len(positives)] if positives else []
            rates += [sum(a is False for a in negatives) / len(negatives)] if negatives else []
            expected = sum(rates) / len(rates) if rates else None
            assert entry[kind]["n"] == len(pairs)
            assert entry[kind]["score"] == pytest.approx(expected)
            assert entry[kind] == _score(qs, js, f.seed, 1000)
            checked += 1
    assert checked == 12


def test_a_rerun_asks_nothing_and_writes_the_same_file(
    explained, qwen2_base, rank1_adapter, text_file
):
    tmp, doc = explained
    cache = tmp / "out.json.explain-cache.jsonl"
    lines = cache.read_text().count("\n")
    again = run_cli(tmp, qwen2_base, rank1_adapter, text_file, *EXPLAIN)
    assert cache.read_text().count("\n") == lines  # every answer came from the cache
    assert without_time(again) == without_time(doc)


def test_the_standalone_step_explains_a_written_file_alike(
    explained, tmp_path, qwen2_base, rank1_adapter, text_file
):
    _, doc = explained
    plain = run_cli(
        tmp_path, qwen2_base, rank1_adapter, text_file, "--baseline-neurons", "2",
        "--below-median-contexts", "4", *SAE,
    )  # fmt: skip
    assert "explanations" not in plain
    data, out = tmp_path / "out.json", tmp_path / "explained.json"
    options = ["--explain-contexts", "4", "--explain-context-tokens", "2", "--quiet"]
    options += ["--explain-features", "3"]
    assert standalone.main(["--data", str(data), "--output", str(out), *options]) == 0
    written = json.loads(out.read_text())
    assert [(k, s, i["explanations"][s]) for k, i, s in features_of(written)] == [
        (k, s, i["explanations"][s]) for k, i, s in features_of(doc)
    ]
    assert without_time(written)["explanations"] == without_time(doc)["explanations"]


def judge_always_yes(text: str) -> str:
    if "What do the marked tokens have in common?" in text:
        return "Explanation: the word 'step'"
    return "yes"


def test_an_endpoint_explains_and_scores(tmp_path, qwen2_base, rank1_adapter, text_file):
    server = Server(reply=judge_always_yes)
    try:
        url = ["--explainer-url", server.url, "--explainer-model", "served-model"]
        doc = run_cli(tmp_path, qwen2_base, rank1_adapter, text_file, *EXPLAIN, *url)
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
    run = doc["explanations"]
    assert run["explainer"] == run["scorer"] == "served-model"
    assert {body["model"] for _, body in server.requests} == {"served-model"}
    for _, item, sign in features_of(doc):
        entry = item["explanations"][sign]
        assert entry["text"] == "the word 'step'"
        detection = entry["detection"]
        assert detection["auroc"] is None  # an endpoint gives no probabilities
        # Always yes: every activating context right, every other wrong.
        f = feature(item, "", SIGN_OF[sign], 4)
        if f.activating and f.non_activating:
            assert detection["score"] == 0.5
        elif f.activating:
            assert detection["score"] == 1.0


def test_an_unreachable_endpoint_is_one_line_before_the_pass(
    tmp_path, qwen2_base, rank1_adapter, text_file, capsys
):
    out = tmp_path / "out.json"
    argv = ["--base-model", str(qwen2_base), "--lora-path", str(rank1_adapter)]
    argv += ["--data-file", str(text_file), "--output", str(out), "--quiet", "--explain"]
    argv += ["--explainer-url", "http://127.0.0.1:9/v1", "--explainer-model", "m"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot use the chat endpoint")
    assert not out.exists() and not (tmp_path / "out.json.ckpt").exists()


def test_a_missing_key_variable_is_one_line(tmp_path, qwen2_base, rank1_adapter, text_file, capsys):
    argv = ["--base-model", str(qwen2_base), "--lora-path", str(rank1_adapter)]
    argv += ["--data-file", str(text_file), "--output", str(tmp_path / "o.json"), "--explain"]
    argv += ["--explainer-url", "http://127.0.0.1:9/v1", "--explainer-model", "m"]
    argv += ["--explainer-key-env", "LORA_TEST_NO_SUCH_KEY"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: the environment variable LORA_TEST_NO_SUCH_KEY (the endpoint's key) is not set"
    ]


def test_the_most_frequent_sae_features_are_explained_and_summarised(explained):
    _, doc = explained
    features = doc["sae"]["features"]
    ranked = sorted(features, key=lambda f: (-f["frequency"], f["index"]))
    explained_ = [f["index"] for f in features if "explanations" in f]
    assert explained_ == sorted(f["index"] for f in ranked[:3])
    for f in features:
        if "explanations" in f:
            entry = f["explanations"]["positive"]
            assert set(f["explanations"]) == {"positive"} and isinstance(entry["text"], str)
            assert entry["detection"]["n"] > 0 and "shuffled" not in entry
    group = doc["explanations"]["summary"]["sae"]
    scores = [f["explanations"]["positive"]["detection"]["score"] for f in features
              if "explanations" in f]  # fmt: skip
    assert group["detection"]["n"] == len([s for s in scores if s is not None])
    assert group["detection"]["mean"] == pytest.approx(
        sum(s for s in scores if s is not None) / group["detection"]["n"]
    )


def test_as_many_non_activating_contexts_as_activating(explained):
    """--explain keeps --explain-contexts windows below each sign's median (the reservoir),
    where the lowest quantile range alone would give 2."""
    _, doc = explained
    counts = [
        (len(f.activating), len(f.non_activating))
        for f in (feature(item, key, SIGN_OF[sign], 4) for key, item, sign in features_of(doc))
    ]
    assert max(n for _, n in counts) == 4
    assert sum(n >= a for a, n in counts) >= 0.9 * len(counts)


def test_a_file_with_fewer_below_median_contexts_warns(explained, tmp_path, capsys):
    tmp, doc = explained
    fewer = copy.deepcopy(doc)
    fewer["metadata"]["below_median_contexts"] = 0
    data, cache = tmp_path / "fewer.json", tmp_path / "cache.jsonl"
    data.write_text(json.dumps(fewer))
    cache.write_text((tmp / "out.json.explain-cache.jsonl").read_text())  # answers to reuse
    options = ["--explain-contexts", "4", "--explain-context-tokens", "2", "--quiet"]
    assert standalone.main(["--data", str(data), "--explain-cache", str(cache), *options]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "warning: the file shows at most 2 contexts below the median per sign (its run's "
        "--below-median-contexts 0), fewer non-activating ones than --explain-contexts 4: rerun "
        "the pass with --below-median-contexts 4 for as many"
    ]


def test_a_file_without_quantile_samples_is_one_line(explained, tmp_path, capsys):
    _, doc = explained
    bare = copy.deepcopy(doc)
    for ref in iter_directions(bare):
        ref.direction["quantile_samples"] = []
    data = tmp_path / "bare.json"
    data.write_text(json.dumps(bare))
    assert standalone.main(["--data", str(data), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs each direction's quantile samples" in err[0]


def test_a_run_killed_while_explaining_resumes_to_the_same_file(
    explained, tmp_path, qwen2_base, rank1_adapter, text_file
):
    """The finished pass is checkpointed before explaining, and every answer is cached as it
    comes: SIGKILL while explaining, then --resume, gives the unbroken run's file."""
    _, doc = explained
    out, cache = tmp_path / "out.json", tmp_path / "out.json.explain-cache.jsonl"
    argv = ["--base-model", str(qwen2_base), "--lora-path", str(rank1_adapter)]
    argv += ["--data-file", str(text_file), "--top-k", str(K), "--context-window", str(W)]
    argv += ["--output", str(out), "--quiet", *EXPLAIN]
    process = subprocess.Popen(
        [sys.executable, SCRIPT, *argv], stderr=subprocess.PIPE, text=True, env=subprocess_env()
    )
    deadline = time.monotonic() + 120
    while not (cache.exists() and cache.read_text().count("\n") >= 1):  # explaining has begun
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.kill()
    process.communicate(timeout=60)
    assert not out.exists() and (tmp_path / "out.json.ckpt").exists()
    assert main([*argv, "--resume"]) == 0
    assert without_time(json.loads(out.read_text())) == without_time(doc)
