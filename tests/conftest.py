import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.browser import browser, open_page  # noqa: F401  (fixtures of every browser test)
from tests.chat_server import Server
from tests.tiny import random_texts, save_adapter, save_base

# Tiny models gain nothing from threads, and on a busy 2-core machine competing threads make
# every op wait: one thread keeps the suite fast, and subprocesses use the same (OMP_NUM_THREADS).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def qwen2_base(tmp_path_factory) -> Path:
    return save_base(tmp_path_factory.mktemp("qwen2"), "qwen2")


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory) -> Path:
    return save_base(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def rank1_adapter(qwen2_base, tmp_path_factory) -> Path:
    return save_adapter(qwen2_base, tmp_path_factory.mktemp("adapter") / "rank1")


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "texts.jsonl"
    rows = [{"text": t, "id": i} for i, t in enumerate(random_texts(24))]
    rows[5]["text"] = ""  # an empty row: skipped, but later rows keep their index
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()
