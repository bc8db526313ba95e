"""C-MAPSS loader and the synthetic generator, through real files in the NASA format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client_hook.trainer.cmapss import (
    CmapssFormatError,
    health_state,
    load_cmapss,
    read_table,
)
from client_hook.trainer.cmapss_synthetic import write_synthetic_cmapss


def write_rows(path: Path, engines: dict[int, int], settings=(0.0, 0.0, 100.0)) -> None:
    """Engines {unit: cycles}; sensor k of cycle c reads k + c, settings fixed."""
    lines = []
    for unit, cycles in engines.items():
        for c in range(1, cycles + 1):
            sensors = " ".join(f"{k + c:.4f}" for k in range(1, 22))
            lines.append(f"{unit} {c} {settings[0]} {settings[1]} {settings[2]} {sensors} ")
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def small_set(tmp_path: Path) -> Path:
    write_rows(tmp_path / "train_FD001.txt", {1: 35, 2: 200})
    write_rows(tmp_path / "test_FD001.txt", {1: 40, 2: 12})
    (tmp_path / "RUL_FD001.txt").write_text("7\n150\n")
    return tmp_path


def test_training_windows_end_at_every_cycle_with_the_remaining_life(small_set: Path):
    data = load_cmapss(small_set)
    engine1 = data.train.rul[data.train.unit == 1]
    assert engine1.tolist() == [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]  # 35 cycles, windows of 30
    assert data.train.x.shape[1:] == (30, 14)


def test_rul_is_capped_at_125(small_set: Path):
    data = load_cmapss(small_set)
    assert data.train.rul.max().item() == 125.0
    assert data.test.rul.tolist() == [7.0, 125.0]


def test_test_set_is_the_last_window_of_each_engine_padded_when_short(small_set: Path):
    data = load_cmapss(small_set)
    assert data.test.x.shape == (2, 30, 14)
    short = data.test.x[1]
    assert torch.equal(short[0], short[17])  # padded with cycle 1
    assert not torch.equal(short[-1], short[-2])


def test_features_are_min_max_scaled_on_the_training_set(small_set: Path):
    data = load_cmapss(small_set)
    assert data.train.x.min().item() == 0.0
    assert data.train.x.max().item() == 1.0


def test_health_state_boundaries():
    rul = torch.tensor([0.0, 25.0, 25.5, 75.0, 75.5, 125.0])
    assert health_state(rul).tolist() == [2, 2, 1, 1, 0, 0]


def test_missing_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="train_FD001.txt"):
        load_cmapss(tmp_path)


def test_wrong_column_count_is_a_format_error(tmp_path: Path):
    (tmp_path / "train_FD001.txt").write_text("1 1 0.0 0.0 100.0 1.0 2.0\n")
    with pytest.raises(CmapssFormatError, match="7 columns"):
        read_table(tmp_path / "train_FD001.txt")


def test_synthetic_files_have_the_nasa_layout(tmp_path: Path):
    write_synthetic_cmapss(tmp_path, train_engines=3, test_engines=4, seed=1)
    table = read_table(tmp_path / "train_FD001.txt")
    assert table.shape[1] == 26
    assert table[:, 0].unique().tolist() == [1.0, 2.0, 3.0]
    assert len((tmp_path / "RUL_FD001.txt").read_text().split()) == 4


def test_synthetic_engines_degrade_toward_failure(tmp_path: Path):
    write_synthetic_cmapss(tmp_path, train_engines=6, test_engines=2, seed=2)
    table = read_table(tmp_path / "train_FD001.txt")
    s4 = 4 + 4  # column of sensor s4
    for unit in table[:, 0].unique():
        rows = table[table[:, 0] == unit]
        assert rows[-20:, s4].mean() > rows[:20, s4].mean() + 10  # hotter near failure


def test_synthetic_six_conditions_are_found_and_scaled_per_condition(tmp_path: Path):
    write_synthetic_cmapss(tmp_path, "FD002", train_engines=6, test_engines=6, seed=3)
    data = load_cmapss(tmp_path, "FD002")
    assert data.num_conditions == 6
    assert data.train.x.min().item() == 0.0 and data.train.x.max().item() == 1.0


def test_synthetic_generation_is_deterministic(tmp_path: Path):
    write_synthetic_cmapss(tmp_path / "a", train_engines=2, test_engines=2, seed=5)
    write_synthetic_cmapss(tmp_path / "b", train_engines=2, test_engines=2, seed=5)
    for name in ("train_FD001.txt", "test_FD001.txt", "RUL_FD001.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
