"""DFR, Deep Feature Reweighting (Kirichenko et al. 2022): a trained run's last layer refit on group-balanced data.

A `train.py` run with `method.name = "dfr"` takes another run's checkpoint (the base, usually ERM:
`method.dfr.base_workdir`, `method.dfr.base_checkpoint`), freezes everything but its classifier `fc`
and refits that layer on held-out data. DFR is one fit, not a sequence of gradient steps, so its
method (`Dfr`) trains with `train_last_layer` instead of the shared step loop.

The held-out data is the validation split: DFR trains on validation labels and groups. A seeded
permutation stratified by group (`method.dfr.split_seed`) cuts it into half A, which fits the layer,
and half B, which chooses its regularisation and reports its validation metrics. As in the paper's
reference code:
- features are the base network's penultimate embeddings (after global pooling, before `fc`),
  standardised with the mean and standard deviation of half A;
- for each C of `method.dfr.c_grid`, an L1-regularised logistic regression (scikit-learn, liblinear)
  is fitted on each of `method.dfr.num_subsamples` group-balanced subsamples of half A (every group
  downsampled to the smallest one's size; the same subsamples for every C, drawn with
  `training.seed`), and their weights and intercepts are averaged;
- the C with the best worst-group accuracy on half B wins (the first in grid order on a tie).
Unlike the reference code, the chosen layer is not refitted on all of the validation split, so that
half B stays held out for the checkpoint's validation metrics.

The chosen layer, folded with the standardisation so that the network computes it directly, replaces
the base's `fc`; the state is saved as a normal run's checkpoints (`latest` and every `best_*` hold the
same state, at step `training.steps`), beside `config.json`, a `metrics.jsonl` row with half B's
metrics and `dfr.json` (C chosen, half-B metrics per C, group sizes), so `evaluate.py` and
`predict.py` read a DFR workdir unchanged. A rerun on a finished workdir restores its state and
returns; an interrupted one redoes the fit, which is deterministic.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from collections.abc import Sequence
from typing import Any

import flax
import jax
import ml_collections
import numpy as np
import optax
import tqdm
from scipy.special import softmax
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from gerne_jax.core import distributed, files, sharding
from gerne_jax.core.errors import ConfigError, InputError
from gerne_jax.data import dataset, normalisation
from gerne_jax.evaluation import evaluate, forward
from gerne_jax.models import factory, pretrained, resnet
from gerne_jax.runs import checkpoints, run_log
from gerne_jax.runs import run as run_lib
from gerne_jax.train import extrapolation, method, train_state, trainer
from gerne_jax.train.train_state import TrainState

REPORT_FILE = "dfr.json"

log = logging.getLogger("train")  # train.py shows this logger at INFO (cli.setup_logging)


@dataclasses.dataclass(frozen=True)
class LastLayer:
    """A classifier on the embeddings: `logits = features @ kernel + bias` (`kernel` [D, K], `bias` [K])."""

    kernel: np.ndarray
    bias: np.ndarray

    def logits(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(features, np.float64) @ self.kernel + self.bias


def split_halves(group: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of half A and half B (sorted, disjoint, together all of `group`'s), stratified by group.

    Each group's members are permuted with `seed`; the first ceil(n / 2) go to A (which fits the layer),
    the rest to B, so every group's counts in the two halves differ by at most one.
    """
    group = np.asarray(group)
    rng = np.random.default_rng(seed)
    half_a, half_b = [], []
    for g in np.unique(group):
        members = rng.permutation(np.flatnonzero(group == g))
        cut = members.size - members.size // 2
        half_a.append(members[:cut])
        half_b.append(members[cut:])
    return np.sort(np.concatenate(half_a)), np.sort(np.concatenate(half_b))


def balanced_subsamples(indices: np.ndarray, group: np.ndarray, num: int, seed: int) -> list[np.ndarray]:
    """`num` subsets of `indices` (sorted), each with every group present there downsampled without
    replacement to the size of the smallest one."""
    indices = np.asarray(indices)
    present, counts = np.unique(group[indices], return_counts=True)
    rng = np.random.default_rng(seed)
    members = [indices[group[indices] == g] for g in present]
    return [np.sort(np.concatenate([rng.choice(m, counts.min(), replace=False) for m in members]))
            for _ in range(num)]


def logistic_regression(features: np.ndarray, label: np.ndarray, c: float) -> LastLayer:
    """L1-regularised logistic regression of the two classes with inverse strength `c` (liblinear, as the
    reference code), as a two-logit layer: its weights w and intercept b become logits -(w.x + b) / 2 and
    (w.x + b) / 2, whose difference is scikit-learn's decision function."""
    fit = LogisticRegression(C=c, l1_ratio=1.0, solver="liblinear").fit(features, label)
    return LastLayer(kernel=np.stack([-fit.coef_[0], fit.coef_[0]], axis=1) / 2,
                     bias=np.array([-fit.intercept_[0], fit.intercept_[0]]) / 2)


def fold_standardisation(layer: LastLayer, mean: np.ndarray, scale: np.ndarray) -> LastLayer:
    """The layer on raw features equal to `layer` on standardised ones, `(features - mean) / scale`."""
    kernel = layer.kernel / scale[:, None]
    return LastLayer(kernel=kernel, bias=layer.bias - mean @ kernel)


@dataclasses.dataclass(frozen=True)
class Fit:
    """DFR's result: the layer for raw features, a JSON-friendly summary (the C chosen, half B's metrics
    per C, group sizes) and half B's `evaluation` report of the chosen layer."""

    layer: LastLayer
    summary: dict[str, Any]
    half_b_report: evaluate.Report


def fit_last_layer(features: np.ndarray, label: np.ndarray, tissue_ratio: np.ndarray, taus: Sequence[float], *,
                   c_grid: Sequence[float], num_subsamples: int, split_seed: int, subsample_seed: int) -> Fit:
    """DFR's layer on validation `features` [M, D] of examples of both classes (see the module docstring)."""
    num_classes, num_attributes = len(dataset.CLASS_NAMES), len(taus) + 1
    attribute = dataset.attribute_from_tissue_ratio(tissue_ratio, taus)
    group = dataset.group_ids(label, attribute, num_classes, num_attributes)
    half_a, half_b = split_halves(group, split_seed)
    subsamples = balanced_subsamples(half_a, group, num_subsamples, subsample_seed)
    scaler = StandardScaler().fit(features[half_a])  # a constant feature gets scale 1
    standardised = scaler.transform(features)
    key = evaluate.tau_key(taus)

    per_c, layers, reports = [], [], []
    with tqdm.tqdm(total=len(c_grid) * num_subsamples, desc="DFR fits", unit="fit", leave=False,
                   disable=jax.process_index() != 0) as progress:
        for c in c_grid:
            fits = []
            for subsample in subsamples:
                fits.append(logistic_regression(standardised[subsample], label[subsample], c))
                progress.update(1)
            layer = LastLayer(kernel=np.mean([f.kernel for f in fits], axis=0),
                              bias=np.mean([f.bias for f in fits], axis=0))
            report = evaluate.report_per_tau(softmax(layer.logits(standardised[half_b]), axis=-1), label[half_b],
                                               tissue_ratio[half_b], [taus])[key]
            layers.append(layer)
            reports.append(report)
            per_c.append({"c": float(c), "half_b_worst_group_accuracy": report["worst_group_accuracy"],
                          "half_b_balanced_class_accuracy": report["balanced_class_accuracy"],
                          "nonzero_weights": int(np.count_nonzero(np.any(layer.kernel != 0, axis=1)))})
            log.info("DFR C = %g: half-B WGA %.4f, BCA %.4f", c, report["worst_group_accuracy"],
                     report["balanced_class_accuracy"])
    wga = np.array([row["half_b_worst_group_accuracy"] for row in per_c], np.float64)
    best = int(np.argmax(np.nan_to_num(wga, nan=-np.inf)))
    names = [f"{dataset.CLASS_NAMES[y]}, {b}" for y in range(num_classes) for b in dataset.tissue_bin_names(taus)]

    def sizes(indices: np.ndarray) -> dict[str, int]:
        return dict(zip(names, np.bincount(group[indices], minlength=len(names)).tolist()))

    summary = {"c": float(c_grid[best]), "per_c": per_c, "num_subsamples": num_subsamples,
               "split_seed": split_seed, "subsample_seed": subsample_seed, "feature_dim": int(features.shape[1]),
               "group_sizes": {"validation": sizes(np.arange(label.size)), "half_a": sizes(half_a),
                               "half_b": sizes(half_b), "subsample": sizes(subsamples[0])}}
    return Fit(layer=fold_standardisation(layers[best], scaler.mean_, scaler.scale_), summary=summary,
               half_b_report=reports[best])


def with_last_layer(config: ml_collections.ConfigDict, model: resnet.ResNet, base: run_lib.RestoredModel,
                    layer: LastLayer, patch_shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> TrainState:
    """A fresh train state of `config` (its optimiser) holding `base`'s network with `fc` replaced by `layer`."""
    params = flax.core.unfreeze(jax.device_get(base.params))
    fc = params["fc"]
    if fc["kernel"].shape != layer.kernel.shape:
        raise ValueError(f"layer kernel {layer.kernel.shape} does not fit the network's fc {fc['kernel'].shape}")
    params["fc"] = {"kernel": np.asarray(layer.kernel, np.float32), "bias": np.asarray(layer.bias, np.float32)}
    variables = {"params": params, "batch_stats": jax.device_get(base.batch_stats)}
    state = train_state.create_train_state(jax.random.key(config.training.seed), model, (1, *patch_shape),
                                           optimizer(config), variables)
    return sharding.replicate(state.replace(step=config.training.steps), mesh)


def optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
    """The saved state's optimiser: the common one (DFR takes no step with it)."""
    return extrapolation.optimizer_from_config(config.optimizer, config.training.steps,
                                               extrapolation.beta_schedule(config.method))


def check_config(config: ml_collections.ConfigDict) -> tuple[pathlib.Path, ml_collections.ConfigDict, str | int]:
    """The base workdir, its config and the checkpoint to start from; ConfigError naming the key at fault."""
    settings = config.method.dfr
    workdir = pathlib.Path(settings.base_workdir)
    if not settings.base_workdir or not (workdir / run_log.CONFIG_FILE).is_file():
        raise ConfigError(f"config method.dfr.base_workdir = {settings.base_workdir!r} must be the workdir of a "
                          "finished run on the same kind of patches (e.g. train.py --config configs/default.py:erm)")
    c_grid = tuple(settings.c_grid)
    if not c_grid or not all(isinstance(c, (int, float)) and np.isfinite(c) and c > 0 for c in c_grid):
        raise ConfigError(f"config method.dfr.c_grid = {settings.c_grid!r} must be one or more numbers > 0 "
                          "(inverse L1 strengths)")
    if not (isinstance(settings.num_subsamples, int) and settings.num_subsamples >= 1):
        raise ConfigError(f"config method.dfr.num_subsamples = {settings.num_subsamples!r} must be an integer >= 1")
    base_config = run_log.read_config(workdir)
    for key, mine, theirs in (
            ("model.name", config.model.name, base_config.model.name),
            ("model.norm", pretrained.resolve_norm(config.model.norm, config.model.init_from),
             pretrained.resolve_norm(base_config.model.norm, base_config.model.init_from)),
            ("model.dtype", config.model.dtype, base_config.model.dtype)):
        if mine != theirs:
            raise ConfigError(f"config {key} = {mine!r}, but the base run {workdir} has {theirs!r}; DFR keeps the "
                              f"base network (set --config.{key}={theirs})")
    name = str(settings.base_checkpoint)
    checkpoint: str | int = int(name) if name.isdigit() else name
    run = checkpoints.RunCheckpoints(workdir, read_only=True)
    try:
        if name not in (*checkpoints.BEST_CHECKPOINTS, checkpoints.LATEST) and not name.isdigit():
            raise ConfigError(f"config method.dfr.base_checkpoint = {name!r} must be one of "
                              f"{', '.join(checkpoints.BEST_CHECKPOINTS)}, latest or a step number")
        if not run.has(checkpoint):
            raise ConfigError(f"config method.dfr.base_checkpoint = {name!r}: {workdir} has no such checkpoint; "
                              f"it has {run.describe_available()}")
    finally:
        run.close()
    return workdir, base_config, checkpoint


def train_last_layer(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                     config_defaults: ml_collections.ConfigDict | None = None) -> TrainState:
    """Runs DFR in `workdir` per `config` (see the module docstring); returns the DFR network's state.

    The config, the base run and the data are checked before anything is written (ConfigError or
    InputError naming them); the run holds the workdir's lock like a training run.
    """
    from gerne_jax.data import input_pipeline  # TensorFlow: only to read the split

    workdir = pathlib.Path(workdir)
    base_workdir, base_config, base_checkpoint = check_config(config)
    metadata = dataset.read_metadata(config.data.dir)
    validation = input_pipeline.load_split(config.data.dir, "validation", in_memory=config.data.in_memory)
    missing = sorted(set(range(len(dataset.CLASS_NAMES))) - set(np.unique(validation["label"]).tolist()))
    if missing:
        raise InputError(f"{config.data.dir}: DFR fits its last layer on the validation split, which has no "
                         f"{', '.join(dataset.CLASS_NAMES[y] for y in missing)} patches")
    patch_shape = tuple(validation["image"].shape[1:])
    mesh = sharding.mesh_of(config.mesh)
    model = factory.create_model(config.model)
    base, base_meta = run_lib.Run.open(base_workdir, mesh=mesh).restore_model(base_checkpoint, patch_shape,
                                                                              config.data.dir)
    steps = config.training.steps
    with distributed.main_process_lock(workdir, "training"):
        run_log.check_config(workdir, config, config_defaults)
        if distributed.is_main_process():
            run_log.write_config(workdir, config, config_defaults)
        ckpt = checkpoints.RunCheckpoints(workdir)
        try:
            if (workdir / REPORT_FILE).is_file() and ckpt.latest_step() == steps:
                log.info("%s holds a finished DFR run; nothing to do", workdir)
                state, _ = ckpt.restore(checkpoints.LATEST,
                                        train_state.abstract_state(model, optimizer(config), patch_shape, mesh,
                                                                   config.training.seed))
                return state
            evaluator = evaluate.Evaluator(
                validation, base.module, taus_list=[tuple(config.data.taus)],
                batch_size=config.data.eval_batch_size, mesh=mesh,
                standardise=normalisation.Standardiser.of(metadata, mesh, num_channels=patch_shape[-1]),
                name="DFR features")
            features = evaluator.predict(base.variables, forward.embeddings).astype(np.float64)
            settings = config.method.dfr
            log.info("DFR: %d validation embeddings of %d features from %s (%s, step %d)", len(features),
                     features.shape[1], base_workdir, base_checkpoint, base_meta["step"])
            fit = fit_last_layer(features, validation["label"], validation["tissue_ratio"],
                                 tuple(config.data.taus), c_grid=tuple(settings.c_grid),
                                 num_subsamples=settings.num_subsamples, split_seed=settings.split_seed,
                                 subsample_seed=config.training.seed)
            state = with_last_layer(config, model, base, fit.layer, patch_shape, mesh)
            # The checkpoints' validation metrics are half B's: half A trained the layer.
            half_b_report = fit.half_b_report
            meta = {"step": steps, "config": config.to_dict(), "metrics": half_b_report,
                    "data_dir": str(pathlib.Path(config.data.dir).absolute())}
            ckpt.update_best(steps, state, meta)
            ckpt.save_latest(steps, state, meta)
            ckpt.wait_until_saved()  # the metrics row and the report mark a finished run: checkpoints first
            if distributed.is_main_process():
                metrics_log = run_log.MetricsLog(workdir, 0)
                metrics_log.write(steps, "validation", evaluate.scalar_metrics(half_b_report))
                metrics_log.close()
                report = {"base_workdir": str(base_workdir.absolute()), "base_checkpoint": str(base_checkpoint),
                          "base_step": base_meta["step"], "note": "DFR trains on validation labels and groups: "
                          "half A fits the last layer, half B chooses C and gives the validation metrics",
                          **fit.summary, "half_b": evaluate.scalar_metrics(half_b_report)}
                files.write_text_atomic(workdir / REPORT_FILE, json.dumps(report, indent=2, allow_nan=True))
            log.info("DFR: C = %g chosen; half-B WGA %.4f, BCA %.4f; saved to %s", fit.summary["c"],
                     half_b_report["worst_group_accuracy"], half_b_report["balanced_class_accuracy"], ckpt.root)
            return state
        finally:
            ckpt.close()


class Dfr(method.Method):
    """DFR (`method.name = "dfr"`): no step loop, one fit of the base run's last layer."""

    def train(self, config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
              config_defaults: ml_collections.ConfigDict | None = None) -> TrainState:
        workdir = pathlib.Path(workdir)
        state = train_last_layer(config, workdir, config_defaults)
        # After the fit, not before: DFR checks its config and base run before it writes anything.
        with distributed.main_process_lock(workdir, "training"):
            trainer.record_data_spec(workdir, run_log.data_spec_of(config.data.dir))
        return state
