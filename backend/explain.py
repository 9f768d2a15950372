"""Explanations of every feature, scored held out, against shuffled and neuron baselines.

A feature is one direction and one sign, as in the reference study; the base model's baseline
neurons (`--baseline-neurons`) are features too, explained and scored identically. Per feature:

1. the explainer writes one explanation from the even-ranked top examples (backend.features);
2. detection: the scorer sees the explanation and one held-out context with its target marked,
   activating ones (the odd-ranked top examples, the quantile samples at or above the 0.9 cut)
   and non-activating ones (those below the sign's median), and says whether it fits;
3. fuzzing: the scorer sees the explanation and an activating context with either the tokens at
   or above the 0.9 cut marked or as many random others, half and half;
4. the shuffled baseline scores each LoRA feature again with another LoRA feature's explanation
   (a seeded derangement), so that an explanation that fits anything scores as it should: high
   on both, and shows no difference.

Every score is a balanced accuracy with its n and a 95% bootstrap interval (backend.scoring). An
answer the scorer gives that is neither yes nor no counts as wrong. The whole step works on the
document (the JSON a run writes), so it runs at the end of a run or on a written file alike, and
calls the explainer and the scorer once each for all features (they batch and cache).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from backend import UserError, warn
from backend.chat import Cache, Chat, LocalChat, MeteredChat
from backend.contract import feature_key, iter_directions, iter_features, neuron_key
from backend.endpoint import EndpointChat
from backend.features import (
    SIGN_NAMES,
    TOP_LISTS,
    Feature,
    detection_cases,
    feature,
    fuzz_cases,
)
from backend.prompts import (
    detection_messages,
    explainer_messages,
    fuzzing_messages,
    parse_explanation,
)
from backend.sampling import SAMPLES
from backend.scoring import auroc, derangement, difference_ci, mean_ci, score

KINDS = ("detection", "fuzzing")
SIGN_OF = {name: sign for sign, name in SIGN_NAMES.items()}  # "positive" -> 1, "negative" -> -1
EXPLANATION_TOKENS = 24  # the longest explanation the explainer may write, in tokens: a phrase


@dataclass(frozen=True)
class Settings:
    """How features are scored: the file's explanations.settings."""

    contexts_per_class: int = 16  # at most this many activating and non-activating contexts
    context_tokens: int = 10  # tokens each side of a scored context's target
    bootstrap_resamples: int = 1000  # of every interval
    seed: int = 0  # of the shuffled baseline's derangement and the summary's intervals


def _features(items: list[tuple[str, dict]], contexts: int) -> list[tuple[dict, Feature]]:
    """Each item's features, of the signs it has top examples of: (item, feature)."""
    return [
        (item, feature(item, key, sign, contexts))
        for key, item in items
        for sign, top in TOP_LISTS.items()
        if item.get(top)  # an SAE feature has no negative side
    ]


def most_frequent(document: dict[str, Any], n: int | None) -> list[dict]:
    """The document's n most frequent SAE features (all of them for None), by index."""
    ranked = sorted(iter_features(document), key=lambda f: (-f["frequency"], f["index"]))
    return sorted(ranked[:n], key=lambda f: f["index"])


@dataclass
class _Question:
    key: str  # the feature scored
    variant: str  # "own" or "shuffled": whose explanation it is asked with
    kind: str  # detection or fuzzing
    label: bool
    messages: list[dict]


def _questions(f: Feature, variant: str, text: str, settings: Settings) -> list[_Question]:
    """The feature's detection and fuzzing questions with explanation `text`."""
    context = settings.context_tokens
    asked = [
        _Question(f.key, variant, "detection", label, detection_messages(text, e, context))
        for e, label in detection_cases(f)
    ]
    asked += [
        _Question(
            f.key,
            variant,
            "fuzzing",
            c.correct,
            fuzzing_messages(text, c.example, c.marked, context),
        )
        for c in fuzz_cases(f, context)
    ]
    return asked


def _score(questions: list[_Question], judgements: list, seed: int, resamples: int) -> dict:
    """A Score of one feature, variant and kind: balanced accuracy, interval, n (and the AUROC
    of detection where the scorer gives probabilities). Neither yes nor no counts as wrong."""
    labels = [q.label for q in questions]
    said = [j.answer for j in judgements]
    predictions = [not label if a is None else a for a, label in zip(said, labels, strict=True)]
    result = score(labels, predictions, resamples, seed)
    if questions and questions[0].kind == "detection":
        p = [j.p_yes for j in judgements]
        result["auroc"] = None if None in p else auroc(labels, p)
    return result


def explain(
    document: dict[str, Any],
    explainer: Chat,
    scorer: Chat,
    settings: Settings,
    sae_features: int | None = None,
) -> dict:
    """Explain and score every feature of `document` in place (each direction's, baseline
    neuron's and, of the `sae_features` most frequent, SAE feature's `explanations`); returns
    the top-level `explanations` without the usage fields."""
    directions = [(ref.key, ref.direction) for ref in iter_directions(document)]
    neurons = [
        (neuron_key(n["layer"], n["neuron"]), n) for n in document.get("baseline_neurons", [])
    ]
    latents = [(feature_key(f["index"]), f) for f in most_frequent(document, sae_features)]
    # A file explained before is explained afresh (its features beyond sae_features too).
    for item in [item for _, item in directions + neurons] + list(iter_features(document)):
        item.pop("explanations", None)
    lora = _features(directions, settings.contexts_per_class)
    baseline = _features(neurons, settings.contexts_per_class)
    sae = _features(latents, settings.contexts_per_class)
    features = [f for _, f in lora + baseline + sae]
    context = settings.context_tokens  # the explainer reads as much context as the scorers
    prompts = [explainer_messages(f.explain, f.sign, f.extreme, context) for f in features]
    answers = explainer.generate(prompts, EXPLANATION_TOKENS)
    texts = {f.key: parse_explanation(a) for f, a in zip(features, answers, strict=True)}
    shuffled = {}
    if len(lora) >= 2:
        order = derangement(len(lora), settings.seed)
        shuffled = {lora[i][1].key: texts[lora[p][1].key] for i, p in enumerate(order)}
    asked = [q for f in features for q in _questions(f, "own", texts[f.key], settings)]
    asked += [
        q
        for _, f in lora
        if f.key in shuffled
        for q in _questions(f, "shuffled", shuffled[f.key], settings)
    ]
    judged = scorer.judge([q.messages for q in asked])
    groups: dict[tuple[str, str, str], tuple[list, list]] = {}
    for q, j in zip(asked, judged, strict=True):
        qs, js = groups.setdefault((q.key, q.variant, q.kind), ([], []))
        qs.append(q)
        js.append(j)

    def scores(f: Feature, variant: str) -> dict:
        return {
            kind: _score(
                *groups.get((f.key, variant, kind), ([], [])), f.seed, settings.bootstrap_resamples
            )
            for kind in KINDS
        }

    for pairs, baselines in ((lora, True), (baseline, False), (sae, False)):
        for item, f in pairs:
            entry = {"text": texts[f.key], **scores(f, "own")}
            if baselines:
                entry["shuffled"] = scores(f, "shuffled")
            item.setdefault("explanations", {})[SIGN_NAMES[f.sign]] = entry
    return {"summary": _summary(lora, baseline, sae, settings), "settings": asdict(settings)}


def _summary(lora: list, baseline: list, sae: list, settings: Settings) -> dict:
    """Means over features with bootstrap intervals: LoRA, neurons, shuffled, the headline
    LoRA minus neurons, and the SAE's features."""

    def values(pairs: list, kind: str, variant: str | None = None) -> list[float]:
        found = []
        for item, f in pairs:
            entry = item["explanations"][SIGN_NAMES[f.sign]]
            value = (entry[variant] if variant else entry)[kind]["score"]
            if value is not None:
                found.append(value)
        return found

    def group(pairs: list, variant: str | None = None) -> dict:
        return {
            kind: mean_ci(values(pairs, kind, variant), settings.bootstrap_resamples, settings.seed)
            for kind in KINDS
        }

    summary = {"lora": group(lora), "shuffled": group(lora, "shuffled")}
    if baseline:
        summary["neurons"] = group(baseline)
        summary["lora_minus_neurons"] = {
            kind: difference_ci(
                values(lora, kind),
                values(baseline, kind),
                settings.bootstrap_resamples,
                settings.seed,
            )
            for kind in KINDS
        }
    if sae:
        summary["sae"] = group(sae)
    return summary


# ---------------------------------------------------------------- who explains, and the run

Local = Callable[[], tuple[Any, Any, str, int]]  # -> (model, tokenizer, its name, batch tokens)


def backends(options: Any, local: Local) -> tuple[MeteredChat, MeteredChat]:
    """(explainer, scorer) as the options choose (RunConfig's explain group, or the standalone
    step's): an endpoint where a URL is given (checked now: an unreachable one is one clear
    line before any work), else the base model through `local`, loaded only then. The scorer
    is the explainer unless a --scorer-* option is given; --scorer-model alone names another
    model of the explainer's endpoint."""

    def backend(url: str | None, model: str | None, key_env: str | None, flag: str) -> MeteredChat:
        if url is None:
            return LocalChat(*local())
        if model is None:
            raise UserError(f"--{flag}-url needs --{flag}-model: the model the endpoint serves")
        chat = EndpointChat(url, model, key_env)
        chat.check()
        return chat

    o = options
    explainer = backend(o.explainer_url, o.explainer_model, o.explainer_key_env, "explainer")
    if (o.scorer_url, o.scorer_model, o.scorer_key_env) == (None, None, None):
        return explainer, explainer
    url = o.scorer_url or (o.explainer_url if o.scorer_model else None)
    if o.scorer_model and url is None:
        raise UserError("--scorer-model names a model of an endpoint: give --scorer-url")
    key_env = o.scorer_key_env or (o.explainer_key_env if url == o.explainer_url else None)
    return explainer, backend(url, o.scorer_model, key_env, "scorer")


def cache_path(given: Path | None, output: Path) -> Path:
    """--explain-cache, or by default the output's name with .explain-cache.jsonl appended."""
    return given or output.with_name(output.name + ".explain-cache.jsonl")


def explain_document(
    document: dict[str, Any],
    chats: tuple[MeteredChat, MeteredChat],
    options: Any,
    cache: Path,
    progress: bool,
) -> dict[str, Any]:
    """Explain and score every feature of `document` in place with the (explainer, scorer)
    `chats` (`backends`), every answer kept in `cache`; writes the top-level `explanations`.
    Returns them with how many answers came from the cache."""
    check_explainable(document)
    below = document["metadata"]["below_median_contexts"]
    if below < options.explain_contexts:
        warn(
            f"the file shows at most {max(below, SAMPLES)} contexts below the median per sign "
            f"(its run's --below-median-contexts {below}), fewer non-activating ones than "
            f"--explain-contexts {options.explain_contexts}: rerun the pass with "
            f"--below-median-contexts {options.explain_contexts} for as many"
        )
    explainer, scorer = chats
    cached = {id(chat): Cache(chat, cache) for chat in (explainer, scorer)}
    for chat in cached.values():
        chat.progress = progress
    context = options.explain_context_tokens
    settings = Settings(
        contexts_per_class=options.explain_contexts,
        context_tokens=document["metadata"]["context_window"] if context is None else context,
    )
    started = time.perf_counter()
    found = explain(
        document, cached[id(explainer)], cached[id(scorer)], settings, options.explain_features
    )
    usage = [chat.usage() for chat in cached.values()]
    document["explanations"] = {
        "explainer": explainer.name,
        "scorer": scorer.name,
        "num_prompts": sum(u["num_prompts"] for u in usage),
        "num_tokens": sum(u["num_tokens"] for u in usage),
        "seconds": round(time.perf_counter() - started, 3),
        **found,
    }
    return {**document["explanations"], "num_cached": sum(u["num_cached"] for u in usage)}


def check_explainable(document: dict[str, Any]) -> None:
    """The file has what explaining reads: the directions' quantile samples, by sign."""
    ranges = [r for ref in iter_directions(document) for r in ref.direction["quantile_samples"]]
    if not ranges or any("sign" not in r for r in ranges):
        raise UserError(
            "explaining needs each direction's quantile samples by sign (from this version of "
            "the run), and this file has none"
        )


def summary_line(found: dict[str, Any]) -> str:
    """The end-of-run line on the scores: means of each group, and the headline."""

    def group(name: str, kind: str) -> str:
        g = found["summary"].get(name, {}).get(kind)
        return "–" if g is None or g["mean"] is None else f"{g['mean']:.2f}"

    parts = [
        f"{kind} LoRA {group('lora', kind)} / neurons {group('neurons', kind)} / shuffled "
        f"{group('shuffled', kind)}"
        for kind in KINDS
    ]
    return (
        f"explained by {found['explainer']}, scored by {found['scorer']}: {'; '.join(parts)} "
        f"({found['num_prompts']} prompts, {found['num_cached']} from the cache, "
        f"{found['num_tokens']} tokens, {found['seconds']:.1f} s)"
    )
