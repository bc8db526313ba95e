"""The README's attach-the-hook example runs as written (given `epochs` and a `loader`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.support import REPO_ROOT


def readme_example() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("## Attach the hook", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "no python example under 'Attach the hook'"
    return match.group(1)


def test_readme_hook_example_records_every_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GRADWATCH_URL", raising=False)
    gen = torch.Generator().manual_seed(0)
    loader = [
        (torch.randn(64, 17, generator=gen), torch.rand(64, generator=gen) * 125,
         torch.randint(0, 3, (64,), generator=gen))
        for _ in range(4)
    ]  # fmt: skip
    exec(compile(readme_example(), "README.md", "exec"), {"epochs": 3, "loader": loader})
    (run_file,) = (tmp_path / ".gradwatch" / "runs").glob("*.jsonl")
    records = [json.loads(line) for line in run_file.read_text().splitlines()]
    epochs = [r["record"] for r in records if r["kind"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    assert epochs[0]["tasks"]["rul"]["grad_norm"] > epochs[0]["tasks"]["health"]["grad_norm"]
