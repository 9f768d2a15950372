"""The commands as a user meets them: the README's option tables are the --help of the scripts,
an install's console scripts run, and the benchmark's quick run still works (so it cannot rot).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# script -> (its console script, the README heading of its options table)
SCRIPTS = {
    "backend/generate_activations_data.py": (
        "lora-activations",
        "### Options of `backend/generate_activations_data.py`",
    ),
    "generate_html_dashboard.py": ("lora-dashboard", "### Options of `generate_html_dashboard.py`"),
    "backend/explain_directions.py": (
        "lora-explain",
        "### Options of `backend/explain_directions.py`",
    ),
}


def run(*command: str | Path, timeout: float = 300) -> str:
    """stdout of a command that must succeed, run from the repo root, its --help unwrapped."""
    env = {**os.environ, "COLUMNS": "100000", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [str(c) for c in command], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def help_defaults(help_text: str) -> dict[str, str]:
    """--option -> its default as --help states it: "required", the text of "(default: ...)",
    or "" for an option without one."""
    entries: dict[str, str] = {}
    current = None
    for line in help_text.splitlines():
        if line.startswith("  -"):  # an option; its help may go on below, indented further
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif current and line.startswith("   "):
            entries[current] += " " + line.strip()
        else:
            current = None
    del entries["-h"]
    found = {}
    for option, entry in entries.items():
        default = re.search(r"\(default: ([^()]*)\)", entry)
        found[option] = "required" if "(required)" in entry else default[1] if default else ""
    return found


def readme_defaults(heading: str) -> dict[str, str]:
    """--option -> its default in the README's table under `heading`, without the backticks."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text[text.index(heading) :].split("\n\n")[1]
    found = {}
    for line in table.splitlines()[2:]:  # after the header and its rule
        option, default, _ = (cell.strip() for cell in line.strip().strip("|").split("|"))
        found[re.match(r"`(--[a-z-]+)", option)[1]] = default.replace("`", "")
    return found


@pytest.mark.parametrize("script", SCRIPTS)
def test_readme_options_table_is_the_help(script):
    _, heading = SCRIPTS[script]
    assert readme_defaults(heading) == help_defaults(run(sys.executable, script, "--help"))


def test_help_parser_reads_what_help_prints():
    """The parsers above against a --help excerpt written out: the check cannot pass empty."""
    excerpt = """usage: x [-h]

options:
  -h, --help            show this help message and exit

model:
  --base-model BASE_MODEL
                        base model (default: Qwen/Qwen2.5-32B-Instruct)
  --lora-path LORA_PATH
                        PEFT LoRA adapter (required)
  --top-k TOP_K         examples (default: 16)
  --dtype {bfloat16,float16,float32}
                        model dtype (default: bfloat16 on a GPU, float32 on the CPU)
  --resume              continue
"""
    assert help_defaults(excerpt) == {
        "--base-model": "Qwen/Qwen2.5-32B-Instruct",
        "--lora-path": "required",
        "--top-k": "16",
        "--dtype": "bfloat16 on a GPU, float32 on the CPU",
        "--resume": "",
    }
    tables = readme_defaults("### Options of `backend/generate_activations_data.py`")
    assert tables["--lora-path"] == "required" and tables["--shard"] == "0/1"
    assert tables["--data-file"] == "" and len(tables) > 20


def test_console_scripts_of_an_install_run(tmp_path):
    """The project installed as `make` installs it (editable, from pyproject.toml) into a fresh
    venv that borrows this environment's packages: each console script's --help is that of its
    script, under its own name, and so is `lora-activations merge --help`."""
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip())
    # Only installed packages, not the repo root: the install itself must bring `backend`.
    borrowed = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    (site / "borrowed.pth").write_text("".join(p + "\n" for p in borrowed))
    install = ("install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-e", ROOT)
    run(python, "-m", "pip", *install)
    for script, (command, _) in SCRIPTS.items():
        for extra in [[], ["merge"]] if command == "lora-activations" else [[]]:
            installed = run(venv / "bin" / command, *extra, "--help")
            direct = run(sys.executable, script, *extra, "--help")
            assert installed.startswith(f"usage: {command} ")
            assert installed == direct.replace(Path(script).name, command)


def test_page_benchmark_reports_every_figure(tmp_path):
    """benchmarks/bench_page.py with one load of each page: every figure is there (none is
    checked against a time: on a shared machine it says nothing)."""
    report = tmp_path / "page.json"
    run(sys.executable, "benchmarks/bench_page.py", "--loads", "1", "--json", report, timeout=600)
    found = json.loads(report.read_text())
    assert found["loads"] == 1 and found["chromium"]
    assert [p["directions"] for p in found["pages"].values()] == [448, 192]
    for page in found["pages"].values():
        assert page["bytes"] > 1_000_000
        times = ("first_paint_ms", "ready_ms", "neighbour_ms", "menu_ms", "layer_ms")
        assert all(math.isfinite(page[t]) and page[t] > 0 for t in times)


def test_sae_benchmark_reports_every_figure(tmp_path):
    """benchmarks/bench_sae.py's smallest run: each figure is there (none checked against a
    time: on a shared machine it says nothing)."""
    report = tmp_path / "sae.json"
    run(sys.executable, "benchmarks/bench_sae.py", "--quick", "--repeats", "1", "--threads",
        "1", "--json", report, timeout=600)  # fmt: skip
    found = json.loads(report.read_text())
    assert found["directions"] == 144 and found["latents"] == 8 * 144 and found["tokens"] > 0
    assert found["pass_seconds"] > 0 and found["with_sae_seconds"] > 0
    assert set(found["parts_seconds"]) == {"cache writes", "training", "quality", "features"}
    assert all(v > 0 for v in found["parts_seconds"].values())
    memory = found["memory"]
    assert memory["4"]["tokens"] == 4 * memory["1"]["tokens"] and memory["ratio_4x"] > 0


def test_benchmark_quick_run_reports_every_figure(tmp_path):
    """benchmarks/bench_pipeline.py's smallest run, every part of it (the tracker alone, the
    pipeline, the floor, the seed, the memory runs in their own processes): its report has
    each figure. Timings on a shared machine say nothing, so none is checked."""
    report = tmp_path / "bench.json"
    out = run(
        sys.executable, "benchmarks/bench_pipeline.py", "--quick", "--model", "deep-narrow",
        "--threads", "1", "--json", report, timeout=600,
    )  # fmt: skip
    result = json.loads(report.read_text())
    assert result["quick"] and result["machine"]["threads"] == 1
    tracker = result["tracker"]
    assert {"core", "tracker", "heap"} <= set(tracker)
    assert all(math.isfinite(v) and v > 0 for v in tracker.values())
    (model,) = result["models"]
    assert model["name"] == "deep-narrow" and model["tokens"] > 0
    assert {"pipeline@2048", "floor@2048", "floor@b=1", "seed"} <= set(model["runs"])
    assert all(len(runs) == 1 and runs[0] > 0 for runs in model["runs"].values())
    memory = model["memory"]
    assert memory["1"]["tokens"] == model["tokens"]  # the pipeline saw every token
    assert memory["4"]["tokens"] == 4 * model["tokens"]
    assert memory["1"]["peak_rss_mib"] > 0 and memory["4"]["peak_rss_mib"] > 0
    assert re.search(r"^(PASS|FAIL)  deep-narrow: pipeline/floor \d", out, re.M)
    assert re.search(r"^(PASS|FAIL)  tracker core .*: \d+\.\d M token-direction", out, re.M)
