"""A synthetic turbofan data set written in the exact C-MAPSS file format.

The real data cannot be downloaded here, so the demo and the tests use engines simulated the way
C-MAPSS itself was built (Saxena, Goebel, Simon, Eklund, "Damage propagation modeling for aircraft
engine run-to-failure simulation", PHM 2008): each engine starts with random initial wear and
degrades exponentially until a failure threshold; the 21 sensors read an operating-point baseline,
a sensor-specific response to the degradation, and measurement noise. Seven sensors do not respond
to wear (s1, s5, s6, s10, s16, s18, s19), as in the real data. With 6 operating conditions (FD002 /
FD004) each cycle is flown at one of the six real operating points, which shift every baseline.

The loader in `cmapss.py` reads these files exactly like the NASA ones.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

# FD001-like sea-level baselines, change at failure, and noise (std) of the 21 sensors.
BASELINE = (
    518.67,
    642.5,
    1590.0,
    1408.0,
    14.62,
    21.61,
    553.4,
    2388.06,
    9050.0,
    1.3,
    47.5,
    521.4,
    2388.06,
    8140.0,
    8.43,
    0.03,
    393.0,
    2388.0,
    100.0,
    38.8,
    23.3,
)
WEAR_RESPONSE = (
    0.0,
    1.2,
    28.0,
    38.0,
    0.0,
    0.0,
    -3.2,
    0.28,
    45.0,
    0.0,
    1.3,
    -2.8,
    0.28,
    35.0,
    0.11,
    0.0,
    4.5,
    0.0,
    0.0,
    -0.65,
    -0.38,
)
NOISE = (
    0.0,
    0.5,
    6.0,
    9.0,
    0.0,
    0.0014,
    0.9,
    0.07,
    15.0,
    0.0,
    0.27,
    0.74,
    0.07,
    19.0,
    0.037,
    0.0,
    1.5,
    0.0,
    0.0,
    0.18,
    0.11,
)
# The six C-MAPSS operating points: altitude (kft), Mach number, throttle resolver angle.
OPERATING_POINTS = (
    (0.0, 0.0, 100.0),
    (10.0, 0.25, 100.0),
    (20.0, 0.70, 100.0),
    (25.0, 0.62, 60.0),
    (35.0, 0.84, 100.0),
    (42.0, 0.84, 100.0),
)
SETTING_NOISE = (0.002, 0.0003, 0.0)


def _engine(life: int, conditions: int, shift: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """(life, 24) rows for one engine: 3 settings + 21 sensors, from cycle 1 to failure."""
    initial_wear = float(torch.rand((), generator=g)) * 0.1
    rate = 3.0 + 3.0 * float(torch.rand((), generator=g))
    t = torch.arange(1, life + 1, dtype=torch.float64) / life
    wear = initial_wear + (1 - initial_wear) * (torch.exp(rate * t) - 1) / (math.exp(rate) - 1)
    sensitivity = 0.8 + 0.4 * torch.rand(21, generator=g, dtype=torch.float64)
    point = torch.randint(0, conditions, (life,), generator=g)
    settings = torch.tensor(OPERATING_POINTS, dtype=torch.float64)[point]
    settings += torch.randn(life, 3, generator=g, dtype=torch.float64) * torch.tensor(SETTING_NOISE)
    factor = 1.0 + shift[point]  # (life, 21)
    base = torch.tensor(BASELINE, dtype=torch.float64) * factor
    response = torch.tensor(WEAR_RESPONSE, dtype=torch.float64) * sensitivity * factor
    noise = torch.randn(life, 21, generator=g, dtype=torch.float64) * torch.tensor(NOISE)
    return torch.cat([settings, base + wear[:, None] * response + noise], dim=1)


def _write(path: Path, engines: list[torch.Tensor]) -> None:
    with open(path, "w", encoding="ascii") as handle:
        for unit, rows in enumerate(engines, start=1):
            for cycle, row in enumerate(rows.tolist(), start=1):
                values = " ".join(f"{v:.4f}" for v in row)
                handle.write(f"{unit} {cycle} {values} \n")  # NASA's lines end with a space


def write_synthetic_cmapss(
    out_dir: str | Path,
    subset: str = "FD001",
    *,
    train_engines: int = 80,
    test_engines: int = 40,
    conditions: int | None = None,
    min_life: int = 130,
    max_life: int = 340,
    seed: int = 0,
) -> Path:
    """Write ``train_/test_/RUL_{subset}.txt`` into `out_dir`; return the folder.

    `conditions` defaults to 6 for FD002/FD004 and 1 otherwise. Test engines are cut at a random
    cycle with 5 to 150 cycles of life left, and ``RUL_{subset}.txt`` holds what was left.
    """
    if conditions is None:
        conditions = 6 if subset in ("FD002", "FD004") else 1
    if not 1 <= conditions <= len(OPERATING_POINTS):
        raise ValueError(f"conditions must be between 1 and {len(OPERATING_POINTS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    # How each operating point shifts each sensor's baseline (point 0 is the reference).
    shift = -0.3 * torch.rand(len(OPERATING_POINTS), 21, generator=g, dtype=torch.float64)
    shift[0] = 0.0

    def life() -> int:
        return int(torch.randint(min_life, max_life + 1, (), generator=g))

    train = [_engine(life(), conditions, shift, g) for _ in range(train_engines)]
    test, remaining = [], []
    for _ in range(test_engines):
        full = _engine(life(), conditions, shift, g)
        left = int(torch.randint(5, min(150, full.shape[0] - 10) + 1, (), generator=g))
        test.append(full[: full.shape[0] - left])
        remaining.append(left)
    _write(out / f"train_{subset}.txt", train)
    _write(out / f"test_{subset}.txt", test)
    (out / f"RUL_{subset}.txt").write_text("".join(f"{r}\n" for r in remaining), encoding="ascii")
    return out
