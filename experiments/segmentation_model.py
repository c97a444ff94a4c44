"""The pixel-wise model of the segmentation study (experiments/segmentation.py, part b): its config, data,
resumable training loop and predictions.

A run trains `gerne_jax.models.segmentation` on the DATA_DIR's training patches and their tumour-mask crops
(`gerne_jax.slides.mask_crops`) with the classifiers' batches: `samplers.PairedIndexSampler` on the groups
(label, tissue-ratio bin at `data.taus`) of `method.batch_plan`; ERM loads the biased row, GERNE both rows
and minimises `(1 + beta) L_lb - beta L_b`, each `L` the batch's mean pixel cross-entropy (divided by the
number of classes as the classifiers' loss, `train_step.classification_loss`). The rows come from the
package's input pipeline (`input_pipeline.train_dataset`) with the mask packed as one more image channel,
so patch and mask are drawn (and augmented) together; patches are standardised on the device
(`normalisation.standardise`) and the optimiser is the classifiers' (`extrapolation.optimizer_from_config`).

Every `training.eval_every` steps and at the last one the validation split is predicted and scored through
the patch labels the segmentation implies (`derived_report`); the parameters with the highest validation
WGA are kept (ties: the earlier step). The whole state is written to `RUN/state.npz` at each evaluation
(numpy arrays, atomically), so a killed run resumes from its last evaluation and draws the same batches.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from configs import demo
from experiments import grid
from gerne_jax.core import config_utils, files, sharding
from gerne_jax.core.errors import InputError
from gerne_jax.data import dataset, input_pipeline, normalisation, samplers
from gerne_jax.data.groups import BIASED, LESS_BIASED
from gerne_jax.evaluation import evaluate, forward
from gerne_jax.models import segmentation
from gerne_jax.slides import mask_crops
from gerne_jax.train import extrapolation, method, train_step

METHODS = {"erm": (BIASED,), "gerne": (BIASED, LESS_BIASED)}  # the rows of the pair each method loads
STATE_FILE, CONFIG_FILE = "state.npz", "config.json"


def study_config(overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """`configs/demo.py`'s GERNE config, the shipped settings (GroupNorm, c = 0.5, beta = 0.5, 1500 steps,
    B = 16, SGD momentum 0.9, weight decay 1e-4, learning rate 0.1 with 100 warm-up steps and cosine
    decay), with `overrides`."""
    return config_utils.with_overrides(demo.get_config("gerne"), dict(overrides))


@dataclasses.dataclass(frozen=True)
class StudyData:
    """The DATA_DIR's splits (`input_pipeline.load_split` plus `mask`, `[M, P, P]` bool) and metadata."""

    splits: dict[str, dict[str, Any]]
    metadata: dict[str, Any]

    @classmethod
    def load(cls, data_dir: str | pathlib.Path, manifest: str | pathlib.Path,
             names: Sequence[str] = ("train", "validation", "test")) -> StudyData:
        splits = {}
        for name in names:
            split = input_pipeline.load_split(data_dir, name)
            split["mask"] = mask_crops.split_mask_crops(data_dir, manifest, name)
            splits[name] = split
        return cls(splits, dataset.read_metadata(data_dir))


def derived_labels(tumour_pixels: np.ndarray, threshold: int) -> np.ndarray:
    """A patch is tumour when the segmentation marks at least `threshold` of its pixels tumour."""
    return (np.asarray(tumour_pixels) >= threshold).astype(np.int32)


def derived_report(tumour_pixels: np.ndarray, split: Mapping[str, Any], threshold: int,
                   taus: Sequence[float]) -> dict[str, Any]:
    """The package's patch metrics (`evaluate.report_per_tau`) of the derived labels on the split's groups."""
    labels = derived_labels(tumour_pixels, threshold)
    (report,) = evaluate.report_per_tau(np.eye(2, dtype=np.float32)[labels], split["label"], split["tissue_ratio"],
                                        [tuple(taus)]).values()
    return report


def chosen_threshold(tumour_pixels: np.ndarray, split: Mapping[str, Any], taus: Sequence[float]) -> int:
    """The count threshold in [1, P^2] with the highest balanced class accuracy of the derived labels on
    `split` (validation); ties go to the smallest threshold."""
    candidates = np.unique(np.clip(tumour_pixels, 1, None))
    scores = [derived_report(tumour_pixels, split, int(t), taus)["balanced_class_accuracy"] for t in candidates]
    return int(candidates[int(np.argmax(scores))])


class Predictor:
    """Per-pixel tumour probabilities `[M, P, P]` of a split's patches for given parameters."""

    def __init__(self, model: segmentation.SegmentationNet, metadata: Mapping[str, Any], batch_size: int):
        mesh = sharding.make_mesh(1)
        self._batch = forward.BatchPredictor(model, normalisation.Standardiser.of(metadata, mesh), mesh, batch_size)

    def __call__(self, params: Any, images: np.ndarray) -> np.ndarray:
        size = self._batch.batch_size
        parts = [np.asarray(self._batch({"params": params}, images[i:i + size]))[:len(images[i:i + size]), ..., 1]
                 for i in range(0, len(images), size)]
        return np.concatenate(parts)


def tumour_pixels(probabilities: np.ndarray) -> np.ndarray:
    """Pixels per patch the segmentation calls tumour (probability above one half, the argmax)."""
    return np.sum(probabilities > 0.5, axis=(1, 2))


@dataclasses.dataclass
class RunState:
    """What `state.npz` holds: the parameters, optimiser state and best parameters, and the record."""

    params: Any
    opt_state: Any
    best_params: Any
    record: dict[str, Any]  # step, best_step, best_wga, finished, history (validation per evaluation)

    def save(self, path: pathlib.Path) -> None:
        leaves = jax.tree.leaves((self.params, self.opt_state, self.best_params))
        with files.atomic_write(path) as temporary, open(temporary, "wb") as handle:
            np.savez(handle, *[np.asarray(leaf) for leaf in leaves], record=json.dumps(self.record))

    @classmethod
    def load(cls, path: pathlib.Path, like: RunState) -> RunState:
        """The saved state, shaped like `like` (a freshly initialised state of the same model and optimiser)."""
        treedef = jax.tree.structure((like.params, like.opt_state, like.best_params))
        with np.load(path) as stored:
            leaves = [jnp.asarray(stored[f"arr_{i}"]) for i in range(treedef.num_leaves)]
            record = json.loads(str(stored["record"]))
        params, opt_state, best_params = jax.tree.unflatten(treedef, leaves)
        return cls(params, opt_state, best_params, record)


def read_record(workdir: pathlib.Path) -> dict[str, Any] | None:
    """The record of a run's saved state (None before its first save)."""
    if not (workdir / STATE_FILE).is_file():
        return None
    with np.load(workdir / STATE_FILE) as stored:
        return json.loads(str(stored["record"]))


def load_best_params(workdir: pathlib.Path, model: segmentation.SegmentationNet, config: ml_collections.ConfigDict,
                     data: StudyData) -> Any:
    """The validation-chosen parameters of a finished run."""
    return RunState.load(workdir / STATE_FILE, _initial_state(model, config, data, 0, 0.0)).best_params


def _initial_state(model: segmentation.SegmentationNet, config: ml_collections.ConfigDict, data: StudyData,
                   seed: int, beta: Any) -> RunState:
    images = data.splits["train"]["image"]
    params = model.init(jax.random.key(seed), jnp.zeros((1, *images.shape[1:]), jnp.float32))["params"]
    optimizer = extrapolation.optimizer_from_config(config.optimizer, config.training.steps, beta)
    return RunState(params, optimizer.init(params), params,
                    {"step": 0, "best_step": 0, "best_wga": -1.0, "finished": False, "history": []})


def check_config(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
    """Records the run's config on its first call; refuses (InputError) a run, finished or not, that was
    started with another config, so a changed `--set` never reuses or resumes runs of the old one."""
    text = config.to_json_best_effort(sort_keys=True, indent=2)
    path = workdir / CONFIG_FILE
    if path.is_file() and path.read_text() != text:
        raise InputError(f"{workdir} was started with another config ({path}); give another --root or remove it")
    if not path.is_file():
        workdir.mkdir(parents=True, exist_ok=True)
        files.write_text_atomic(path, text)


def _make_step(model: segmentation.SegmentationNet, optimizer: optax.GradientTransformationExtraArgs,
               metadata: Mapping[str, Any], beta_of: Any, divide: bool):
    """The jitted update of a packed batch `[R, n, P, P, C + 1]` (the mask in the last channel)."""
    mean, std = (jnp.asarray(v) for v in normalisation.channel_statistics(metadata["channel_mean"],
                                                                          metadata["channel_std"]))

    @jax.jit
    def step(params, opt_state, packed, count):
        images, masks = packed[..., :-1], packed[..., -1].astype(jnp.int32)
        rows, n = images.shape[:2]
        beta = jnp.asarray(beta_of(count) if callable(beta_of) else beta_of, jnp.float32)
        weights = jnp.ones(1) if rows == 1 else jnp.stack([-beta, 1.0 + beta])  # rows: biased, less-biased

        def loss_fn(p):
            flat = normalisation.standardise(images.reshape(rows * n, *images.shape[2:]), mean, std)
            logits = model.apply({"params": p}, flat, train=True).reshape(rows, n, *masks.shape[2:], -1)
            losses = jnp.stack([train_step.classification_loss(logits[r], masks[r], divide) for r in range(rows)])
            return jnp.dot(weights, losses)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def train_run(workdir: pathlib.Path, method_name: str, config: ml_collections.ConfigDict, data: StudyData) -> bool:
    """Trains (or resumes) one run of seed `training.seed` to `training.steps`; False when it was finished
    already (module docstring)."""
    with grid.claim(workdir, wait=True):
        check_config(workdir, config)
        record = read_record(workdir)
        if record is not None and record["finished"]:
            return False
        _train(workdir, method_name, config.training.seed, config, data)
    return True


def _train(workdir: pathlib.Path, method_name: str, seed: int, config: ml_collections.ConfigDict,
           data: StudyData) -> None:
    train, validation = data.splits["train"], data.splits["validation"]
    taus = tuple(config.data.taus)
    beta = extrapolation.beta_schedule(config.method) if method_name == "gerne" else 0.0
    attribute = dataset.attribute_from_tissue_ratio(train["tissue_ratio"], taus)
    plan = method.batch_plan(config, train["label"], attribute, c=config.method.c,
                             beta=config.method.beta if method_name == "gerne" else 0.0)
    sampler = samplers.PairedIndexSampler(plan, train["label"], attribute, seed)
    model = segmentation.create_segmentation_model(config.model.name, norm=config.model.norm)
    optimizer = extrapolation.optimizer_from_config(config.optimizer, config.training.steps, beta)
    state = _initial_state(model, config, data, seed, beta)
    if (workdir / STATE_FILE).is_file():
        state = RunState.load(workdir / STATE_FILE, state)
        print(f">>> {workdir.name}: resuming at step {state.record['step']}", flush=True)
    packed = np.concatenate([train["image"], train["mask"][..., None].astype(train["image"].dtype)], axis=-1)
    start, steps = state.record["step"], config.training.steps
    batches = input_pipeline.train_dataset(packed, train["label"], sampler, start_step=start, rows=METHODS[method_name],
                                           flips=config.data.flips, rotations=config.data.rotations,
                                           process_index=0, process_count=1).as_numpy_iterator()
    step_fn = _make_step(model, optimizer, data.metadata, beta, config.method.divide_loss_by_num_classes)
    predict = Predictor(model, data.metadata, config.data.eval_batch_size)
    threshold = int(data.metadata["min_tumour_pixels"])
    bar = tqdm.trange(start, steps, initial=start, total=steps, desc=workdir.name, unit="step")
    for step in bar:
        state.params, state.opt_state, loss = step_fn(state.params, state.opt_state, next(batches)["image"], step)
        if (step + 1) % config.training.eval_every and step + 1 != steps:
            continue
        if not np.isfinite(float(loss)):
            raise InputError(f"{workdir.name}: the loss is {float(loss)} at step {step + 1}; lower the learning rate")
        report = derived_report(tumour_pixels(predict(state.params, validation["image"])), validation, threshold, taus)
        wga, bca = report["worst_group_accuracy"], report["balanced_class_accuracy"]
        if wga > state.record["best_wga"]:
            state.best_params = state.params
            state.record.update(best_step=step + 1, best_wga=wga)
        state.record["history"].append({"step": step + 1, "loss": float(loss), "val WGA": wga, "val BCA": bca})
        state.record.update(step=step + 1, finished=step + 1 == steps)
        state.save(workdir / STATE_FILE)
        bar.set_postfix(loss=f"{float(loss):.4f}", val_wga=f"{wga:.3f}", best=state.record["best_step"])
    bar.close()


def evaluate_run(workdir: pathlib.Path, config: ml_collections.ConfigDict, data: StudyData,
                 split: str) -> dict[str, Any]:
    """A finished run's validation-chosen parameters on `split`: per-pixel tumour probabilities `[M, P, P]`,
    the derived-label reports with the data's rule and with the count threshold chosen on validation BCA."""
    model = segmentation.create_segmentation_model(config.model.name, norm=config.model.norm)
    params = load_best_params(workdir, model, config, data)
    predict = Predictor(model, data.metadata, config.data.eval_batch_size)
    taus, rule = tuple(config.data.taus), int(data.metadata["min_tumour_pixels"])
    chosen = chosen_threshold(tumour_pixels(predict(params, data.splits["validation"]["image"])),
                              data.splits["validation"], taus)
    probabilities = predict(params, data.splits[split]["image"])
    counts = tumour_pixels(probabilities)
    return {"probabilities": probabilities, "record": read_record(workdir), "chosen_threshold": chosen,
            "data_rule": derived_report(counts, data.splits[split], rule, taus),
            "chosen_rule": derived_report(counts, data.splits[split], chosen, taus)}
