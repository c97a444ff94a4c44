"""The comparison's rows: each method with its one fixed method-specific setting, the runs they build on,
and the learning rate, the one value tuned (experiments/comparison.py, docs/comparison.md)."""
from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from experiments import grid
from experiments.grid import Setting
from gerne_jax.core import files

LR = "optimizer.learning_rate"
SAMPLING = "method.erm.sampling"
LADDER = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)  # where an edge choice extends the grid
CLASS_BALANCED = {SAMPLING: "class_balanced"}  # attribute-free ERM: also JTT's and the pseudo-groups' first runs
IDENTIFICATION = Setting("erm", {LR: 0.1, "training.steps": 300, **CLASS_BALANCED})  # JTT's ERM run of T = 300
SCORING = Setting("erm_scoring", {LR: 0.01, **CLASS_BALANCED})  # ERM at lr / 10, weight decay x 2


@dataclasses.dataclass(frozen=True)
class Row:
    """A row of the table: a method and its one fixed method-specific setting; the learning rate is tuned."""

    name: str
    method: str
    overrides: Mapping[str, Any]
    summary: str  # what it trains on, for the report

    @property
    def k(self) -> float | None:
        """c (beta + 1) of a row on GERNE's paired batches: the weight of the less-biased shares (docs/design.md §3)."""
        if self.method not in ("gerne", "resample"):
            return None
        c, beta = self.overrides.get("method.c", 1.0), self.overrides.get("method.beta", 0.0)
        return c * (beta + 1)


def _gerne(k: float) -> Row:
    return Row(f"gerne_k{k:g}", "gerne", {"method.c": 0.5, "method.beta": 2 * k - 1},
               f"GERNE, c = 0.5, beta = {2 * k - 1:g}")


GERNE_ARMS = tuple(_gerne(k) for k in (0.75, 1.0, 1.5, 2.0))  # interpolate, balance, extrapolate twice
ROWS = (
    Row("erm_natural", "erm", {SAMPLING: "natural"}, "plain ERM: batches drawn uniformly from the training split"),
    Row("erm", "erm", CLASS_BALANCED, "ERM, class-balanced batches (the attribute unread)"),
    Row("resample", "resample", {}, "group-balanced resampling (c = 1, beta = 0)"),
    *GERNE_ARMS,
    Row("group_dro", "group_dro", {"method.group_dro.eta": 0.01}, "GroupDRO, eta = 0.01, group-balanced batches"),
    Row("jtt", "jtt", {"method.jtt.upweight": 20.0}, "JTT, T = 300 steps of class-balanced ERM, lambda = 20"),
    Row("dfr", "dfr", {"method.dfr.base_checkpoint": "latest"},
        "DFR: the last layer of class-balanced ERM (the learning rate is its base run's) refitted on validation"),
    Row("gerne_pseudo", "gerne", {"method.c": 0.5, "method.beta": 1.0, "method.pseudo_groups.fraction": 0.2},
        "GERNE (c = 0.5, beta = 1) on pseudo-groups, t = 0.2, from class-balanced ERM at lr 0.01"),
)
REFERENCE = "erm"  # the row every other is paired with
RESAMPLING = "resample"  # the row each GERNE arm is also paired with: does extrapolation beat resampling?
ROWS_BY_NAME = {row.name: row for row in ROWS}


def run_template(setting: Setting, runs: pathlib.Path) -> str:
    """The folder of `setting`'s run under `runs` for any seed (`{seed}`: see experiments/grid.py)."""
    return str(runs / grid.run_name(setting, grid.SEED_PLACEHOLDER))


def erm_setting(lr: float) -> Setting:
    return Setting("erm", {**CLASS_BALANCED, LR: lr}, row=REFERENCE)


def row_setting(row: Row, lr: float, runs: pathlib.Path) -> Setting:
    """The row's run at learning rate `lr` (for DFR: its base run's learning rate)."""
    overrides = dict(row.overrides)
    if row.name == "dfr":
        overrides["method.dfr.base_workdir"] = run_template(erm_setting(lr), runs)
    else:
        overrides[LR] = lr
    if row.name == "jtt":
        overrides["method.jtt.identification_workdir"] = run_template(IDENTIFICATION, runs)
    if row.name == "gerne_pseudo":
        overrides["method.pseudo_groups.scoring_workdir"] = run_template(SCORING, runs)
    return Setting(row.method, overrides, row=row.name)


def learning_rate(setting: Setting) -> float:
    """The tuned value of a setting: its learning rate, or DFR's base run's."""
    if setting.method == "dfr":
        base = pathlib.PurePath(setting.overrides["method.dfr.base_workdir"]).name
        return next(lr for lr in LADDER if grid.run_name(erm_setting(lr), grid.SEED_PLACEHOLDER) == base)
    return float(setting.overrides[LR])


def save_chosen(path: pathlib.Path, settings: Sequence[Setting], runs: pathlib.Path) -> None:
    """The chosen settings, with other runs' folders relative to the runs folder (portable)."""
    document = [{"row": s.family, "method": s.method,
                 "overrides": {k: v.replace(str(runs), "{runs}") if isinstance(v, str) else v
                               for k, v in s.overrides.items()}} for s in settings]
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_text_atomic(path, json.dumps(document, indent=2))


def load_chosen(path: pathlib.Path, runs: pathlib.Path) -> list[Setting]:
    return [Setting(entry["method"], {k: v.replace("{runs}", str(runs)) if isinstance(v, str) else v
                                      for k, v in entry["overrides"].items()}, row=entry["row"])
            for entry in json.loads(pathlib.Path(path).read_text())]
