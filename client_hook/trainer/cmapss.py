"""NASA C-MAPSS turbofan data: read the original files, prepare windows for RUL + health state.

Files (Saxena et al., PHM 2008): ``train_FD00x.txt``, ``test_FD00x.txt``, ``RUL_FD00x.txt``, space
separated, no header, 26 columns: unit, cycle, 3 operating settings, 21 sensors. The usual
preparation, applied here:

- keep the 14 informative sensors s2, s3, s4, s7, s8, s9, s11, s12, s13, s14, s15, s17, s20, s21;
- operating conditions: the 3 settings are clustered (see `condition_centres`) and every sensor is
  min-max scaled per condition with the training set's extremes (FD002/FD004 have 6 conditions);
- windows of 30 cycles (an engine shorter than that is padded with its first cycle); training uses
  every window, the test set the last window of each engine with the RUL from ``RUL_FD00x.txt``;
- RUL capped at 125 (piecewise-linear target), in training AND test labels;
- health state, 3 classes from the capped RUL: 0 healthy (RUL > 75), 1 degrading (25 < RUL <= 75),
  2 critical (RUL <= 25). The boundaries are ours (the data set has no health labels).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

SENSORS = (2, 3, 4, 7, 8, 9, 11, 12, 13, 14, 15, 17, 20, 21)
SENSOR_COLUMNS = tuple(4 + s for s in SENSORS)  # unit, cycle, 3 settings, then s1 at column 5
WINDOW = 30
RUL_CAP = 125.0
HEALTH_BOUNDARIES = (25.0, 75.0)  # critical <= 25 < degrading <= 75 < healthy
HEALTH_CLASSES = ("healthy", "degrading", "critical")
# The smallest separation between two distinct operating points, per setting (altitude in kft,
# Mach number, throttle resolver angle): the six C-MAPSS points differ by >= 5 kft, >= 0.08 Mach
# or 40 degrees, while the recorded noise is below 0.01 kft / 0.001 Mach.
SETTING_RESOLUTION = (1.0, 0.05, 5.0)


class CmapssFormatError(ValueError):
    """A file that is not in the C-MAPSS format."""


@dataclass
class CmapssSplit:
    """Windows (N, window, 14), capped RUL (N,), health class (N,), engine id (N,)."""

    x: Tensor
    rul: Tensor
    health: Tensor
    unit: Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass
class CmapssData:
    subset: str
    train: CmapssSplit
    test: CmapssSplit
    num_conditions: int


def read_table(path: Path) -> Tensor:
    """A C-MAPSS text file as a float64 (rows, 26) tensor."""
    rows = []
    with open(path, encoding="ascii") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 26:
                raise CmapssFormatError(f"{path}:{number}: {len(fields)} columns, expected 26")
            try:
                rows.append([float(f) for f in fields])
            except ValueError as exc:
                raise CmapssFormatError(f"{path}:{number}: {exc}") from None
    if not rows:
        raise CmapssFormatError(f"{path}: no rows")
    return torch.tensor(rows, dtype=torch.float64)


def read_rul(path: Path) -> Tensor:
    """``RUL_FD00x.txt``: one true remaining life per test engine."""
    with open(path, encoding="ascii") as handle:
        values = [float(line.split()[0]) for line in handle if line.strip()]
    return torch.tensor(values, dtype=torch.float64)


def health_state(rul: Tensor) -> Tensor:
    """0 healthy, 1 degrading, 2 critical (see HEALTH_BOUNDARIES)."""
    critical, degrading = HEALTH_BOUNDARIES
    return (rul <= degrading).long() + (rul <= critical).long()


def condition_centres(settings: Tensor) -> Tensor:
    """Operating points (K, 3): each setting split at gaps wider than its resolution."""
    labels = torch.zeros(settings.shape[0], dtype=torch.long)
    for column, resolution in enumerate(SETTING_RESOLUTION):
        values, order = settings[:, column].sort()
        group = torch.zeros_like(labels)
        group[order] = torch.cumsum((values.diff(prepend=values[:1]) > resolution).long(), 0)
        labels = labels * (int(group.max()) + 1) + group
    return torch.stack([settings[labels == k].mean(0) for k in labels.unique()])


def assign_conditions(settings: Tensor, centres: Tensor) -> Tensor:
    """The index of the nearest operating point, distances in units of SETTING_RESOLUTION."""
    scale = torch.tensor(SETTING_RESOLUTION, dtype=settings.dtype)
    return torch.cdist(settings / scale, centres / scale).argmin(1)


def _scale_per_condition(train: Tensor, test: Tensor) -> tuple[Tensor, Tensor, int]:
    centres = condition_centres(train[:, 2:5])
    train_cond = assign_conditions(train[:, 2:5], centres)
    test_cond = assign_conditions(test[:, 2:5], centres)
    columns = list(SENSOR_COLUMNS)
    train_x, test_x = train[:, columns].clone(), test[:, columns].clone()
    for k in range(centres.shape[0]):
        rows = train_x[train_cond == k]
        low, high = rows.min(0).values, rows.max(0).values
        span = torch.where(high - low > 1e-8, high - low, torch.ones_like(high))
        train_x[train_cond == k] = (train_x[train_cond == k] - low) / span
        test_x[test_cond == k] = (test_x[test_cond == k] - low) / span
    return train_x.float(), test_x.float(), int(centres.shape[0])


def _engines(table: Tensor) -> list[Tensor]:
    """Row indices of each engine, sorted by cycle, in order of unit number."""
    units = table[:, 0].long()
    out = []
    for unit in units.unique():
        rows = (units == unit).nonzero().squeeze(1)
        out.append(rows[table[rows, 1].argsort()])
    return out


def _windows(features: Tensor, window: int) -> Tensor:
    """All windows (n, window, F) of one engine; padded in front with its first cycle if short."""
    if features.shape[0] < window:
        pad = features[:1].expand(window - features.shape[0], -1)
        features = torch.cat([pad, features])
    return features.unfold(0, window, 1).transpose(1, 2)


def _split(
    table: Tensor, features: Tensor, window: int, rul_cap: float, final_rul: Tensor | None
) -> CmapssSplit:
    xs, ruls, units = [], [], []
    for index, rows in enumerate(_engines(table)):
        cycles = table[rows, 1]
        windows = _windows(features[rows], window)
        end_cycles = cycles[-windows.shape[0] :] if cycles.shape[0] >= window else cycles[-1:]
        if final_rul is None:  # training: the engine runs to failure
            rul = cycles[-1] - end_cycles
        else:  # test: last window, RUL from the RUL file
            windows, rul = windows[-1:], final_rul[index].reshape(1)
        xs.append(windows)
        ruls.append(rul.clamp(max=rul_cap))
        units.append(torch.full((windows.shape[0],), int(table[rows[0], 0])))
    rul_all = torch.cat(ruls).float()
    return CmapssSplit(torch.cat(xs).contiguous(), rul_all, health_state(rul_all), torch.cat(units))


def load_cmapss(
    data_dir: str | Path, subset: str = "FD001", *, window: int = WINDOW, rul_cap: float = RUL_CAP
) -> CmapssData:
    """Read ``{train,test,RUL}_{subset}.txt`` from `data_dir` and prepare them."""
    data_dir = Path(data_dir)
    paths = [data_dir / f"{kind}_{subset}.txt" for kind in ("train", "test", "RUL")]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"C-MAPSS file not found: {path}")
    train, test, final_rul = read_table(paths[0]), read_table(paths[1]), read_rul(paths[2])
    test_engines = int(test[:, 0].unique().numel())
    if final_rul.numel() != test_engines:
        raise CmapssFormatError(
            f"{paths[2]}: {final_rul.numel()} values for {test_engines} test engines"
        )
    train_x, test_x, conditions = _scale_per_condition(train, test)
    return CmapssData(
        subset=subset,
        train=_split(train, train_x, window, rul_cap, None),
        test=_split(test, test_x, window, rul_cap, final_rul),
        num_conditions=conditions,
    )
