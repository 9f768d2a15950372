"""benchmarks/gpu_check.py on a tiny Qwen2 on the CPU: the code path the GPU run takes, run as
the GPU machine runs it (a script from the repo root, no gguf, no datasets, no network)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_check import RESULTS, STAGES

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
ABSENT = ("gguf", "datasets")  # not installed on the GPU machine


def run_script(args: list[str], before: str = "") -> subprocess.CompletedProcess:
    """The script in a fresh process, with gguf and datasets made unimportable (as where they
    are not installed) and still unimported when it ends; `before`: code run first."""
    code = "\n".join(
        [
            "import runpy, sys",
            f"for name in {ABSENT!r}: sys.modules[name] = None",
            before,
            f"sys.argv = [{str(SCRIPT)!r}, *{args!r}]",
            "try:",
            f"    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')",
            "finally:",
            f"    assert all(sys.modules[name] is None for name in {ABSENT!r})",
        ]
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600
    )


def records(out: Path) -> dict[str, dict]:
    lines = (out / RESULTS).read_text(encoding="utf-8").splitlines()
    found = [json.loads(line) for line in lines]
    return {r["stage"]: r for r in found}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu-check")
    return run_script(["--tiny", "--out", str(out)]), out


def test_tiny_run_records_every_stage(tiny_run) -> None:
    done, out = tiny_run
    assert done.returncode == 0, done.stderr[-3000:]
    found = records(out)
    assert list(found) == ["machine", *(name for name, _, _ in STAGES), "summary"]
    assert not [name for name, r in found.items() if "error" in r]
    assert not [name for name, r in found.items() if "skipped" in r]
    build = found["build"]
    assert build["directions"] == build["lora_modules"] == 2 * 7  # 2 layers, 7 projections
    assert build["lora_b_nonzero"] and build["rslora"] and build["param_device"] == "cpu"
    assert build["tokens"] >= 512 and 48 <= build["lengths"][0] <= build["lengths"][1] <= 128
    for name in ("floor", "pass", "floor_again"):
        assert found[name]["tokens"] == build["tokens"]
        assert found[name]["seconds"] > 0 and found[name]["tokens_per_s"] > 0
    assert found["pass"]["examples"] == build["sequences"] and found["pass"]["nonfinite"] == 0
    assert found["export"]["bytes"] > 0 and found["export_effects"]["bytes"] > 0
    profile = found["profile"]
    assert 0 < profile["batch_tokens"] <= build["tokens"] and profile["layers"] == 2
    assert profile["calls_in_tracker"]  # the tracker's top-k needs the host: some waits
    effects = found["effects"]
    assert effects["rows"] == 2 and effects["row_tokens"] == 32
    assert effects["ablations"] == 14 + 2 + 7  # directions, layers, modules
    assert 0 < effects["row_steady_seconds"] < effects["seconds"]
    naive = found["naive"]
    assert naive["ablations"] == naive["ablations_timed"] == 23  # fewer than 32: all of them
    assert naive["row_estimated_seconds"] > naive["fixed_seconds"] > 0
    assert found["sae"]["seconds"] > 0 and found["sae"]["overhead_over_pass"] > -1
    page = out / "dashboard.html"
    assert found["dashboard"]["page_bytes"] == page.stat().st_size > 0
    assert found["dashboard"]["document"] == "activations-effects.json"
    assert page.read_text(encoding="utf-8").lstrip().lower().startswith("<!doctype html")
    summary = found["summary"]
    assert summary["pipeline_over_floor"] > 0 and summary["effects_over_naive"] > 0
    assert sum(summary["shares"].values()) == pytest.approx(1)
    assert (out / "profile.txt").stat().st_size > 0


def test_failing_stage_keeps_the_other_figures(tmp_path) -> None:
    """The effects fail: the stages before keep their figures, the export of the effects is
    skipped, and the stages that do not need the effects still run."""
    inject = (
        "import backend.effects\n"
        "def fail(self, ids): raise RuntimeError('injected')\n"
        "backend.effects.Effects.row = fail"
    )
    done = run_script(["--tiny", "--out", str(tmp_path)], before=inject)
    assert done.returncode == 1
    found = records(tmp_path)
    assert found["effects"]["error"] == "RuntimeError: injected"
    assert found["export_effects"]["skipped"] == "effects failed"
    for name in ("build", "floor", "pass", "export", "profile", "naive", "dashboard"):
        assert "error" not in found[name] and found[name]["peak_rss_gib"] > 0, name
    assert found["pass"]["seconds"] > 0
    assert found["dashboard"]["document"] == "activations.json"  # the pass's, effects failed
    assert found["summary"]["effects_over_naive"] is None


def test_bad_option_is_one_line(tmp_path) -> None:
    done = run_script(["--tiny", "--effects-rows", "0", "--out", str(tmp_path)])
    assert done.returncode == 2
    assert "--effects-rows must be at least 1" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where no GPU is")
def test_no_gpu_is_one_line(tmp_path) -> None:
    done = run_script(["--out", str(tmp_path)])
    assert done.returncode == 2
    assert done.stderr.strip() == "error: no CUDA device here: run with --tiny (or --device cpu)"


def test_pipeline_and_dashboard_import_neither_gguf_nor_datasets() -> None:
    """Nor does naming a hub model (resolve_base_model reads backend.embedded) or importing the
    explanations' step: only converting a GGUF and reading a hub dataset need them."""
    code = (
        "import sys\n"
        "import backend.pipeline, backend.explain_directions, generate_html_dashboard\n"
        "import benchmarks.gpu_check\n"
        "from backend.loading import resolve_base_model\n"
        "assert resolve_base_model('Qwen/Qwen2.5-32B').path == 'Qwen/Qwen2.5-32B'\n"
        f"print(sorted(name for name in {ABSENT!r} if name in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"
