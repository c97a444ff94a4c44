"""Training methods: one value, built once from the config, that decides the sampler, optimiser and step.

A method decides three things that must agree: which batches the input pipeline yields (GERNE's pair,
or the biased batch alone: its `plan` and `rows`, which `input_pipeline.training_batches(method, ...)`
reads), the optimiser (always `extrapolation.make_optimizer`, with the method's learning-rate and beta
schedules), and the kind of train step (two gradients, folded, single batch). `TrainingMethod` makes
all three from the same fields, so they cannot disagree; it imports no TensorFlow. The methods
(docs/design.md §3):

- `gerne`: paired batches; beta in [-1, beta_max]; two gradients, or the folded one-gradient path
  with `method.fold_beta_into_loss`. Group resampling is `gerne` with c = 1 and beta = 0.
- `erm`: the biased batch alone. It is the biased row of the same paired draws, so ERM and GERNE runs
  with one seed see the same biased batches (a controlled comparison).
- `group_dro` (`gerne_jax.methods.group_dro`): one batch, group-balanced (the less-biased row with c = 1,
  as in the official GroupDRO runs) or natural (the biased row), with each example's group; the
  step's loss is the robust loss under the online group weights, which the optimiser state carries.
- `jtt` (`gerne_jax.methods.jtt`): ERM's single class-balanced batch, drawn with the identification run's
  misclassified examples upweighted by lambda (`example_weights`).
- `dfr` (`gerne_jax.methods.dfr`): no training steps; another run's last layer refitted on group-balanced
  validation data. `trainer.train_and_evaluate` hands it to `dfr.train_last_layer`, so it has no
  `TrainingMethod`.

`gerne` with `method.pseudo_groups.scoring_workdir` (`gerne_jax.methods.pseudo_groups`) plans its batches on
pseudo-groups (unknown attributes) instead of the tissue-ratio bins.
- `ratio_weighted` (`gerne_jax.methods.ratio_weighting`): JTT's single class-balanced batch, each example drawn
  with weight 1 / (kernel density of its tissue ratio within its class): no threshold tau.

A new method is a new `name` here: its sampler rows, its step and its config keys.
"""
from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from gerne_jax.core.errors import ConfigError
from gerne_jax.data import dataset, groups
from gerne_jax.data.groups import BIASED, LESS_BIASED
from gerne_jax.methods import group_dro, jtt, pseudo_groups, ratio_weighting
from gerne_jax.models import resnet
from gerne_jax.train import extrapolation, train_step

METHOD_NAMES = ("gerne", "erm", "group_dro", "jtt", "ratio_weighted", "dfr")
GROUP_DRO_SAMPLING = ("balanced", "natural")


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Constant or cosine decay over `training.steps`, after `optimizer.warmup_steps` of linear warm-up."""
    opt, steps = config.optimizer, config.training.steps
    if opt.schedule == "constant":
        decay = optax.constant_schedule(opt.learning_rate)
    elif opt.schedule == "cosine":
        decay = optax.cosine_decay_schedule(opt.learning_rate, max(steps - opt.warmup_steps, 1))
    else:
        raise ConfigError(f"config optimizer.schedule must be 'constant' or 'cosine', got {opt.schedule!r}")
    if opt.warmup_steps <= 0:
        return decay
    warmup = optax.linear_schedule(0.0, opt.learning_rate, opt.warmup_steps)
    return optax.join_schedules([warmup, decay], [opt.warmup_steps])


def beta_schedule(config: ml_collections.ConfigDict) -> optax.ScalarOrSchedule:
    """`method.beta`, or a linear ramp to it from 0 (resampling) over `method.beta_warmup_steps`."""
    if config.method.beta_warmup_steps > 0:
        return optax.linear_schedule(0.0, config.method.beta, config.method.beta_warmup_steps)
    return config.method.beta


def num_groups(config: ml_collections.ConfigDict) -> int:
    """K * A, the groups the config's thresholds make."""
    return len(dataset.CLASS_NAMES) * (len(config.data.taus) + 1)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
    """The optimiser of every method (its structure depends on the config only, not on the data).

    GroupDRO chains its group weights before it, so that they are saved and restored with the state.
    """
    optimizer = extrapolation.make_optimizer(learning_rate_schedule(config), beta_schedule(config),
                                             momentum=config.optimizer.momentum,
                                             weight_decay=config.optimizer.weight_decay)
    if config.method.name == "group_dro":
        return optax.chain(group_dro.track_group_weights(num_groups(config)), optimizer)
    return optimizer


@dataclasses.dataclass(frozen=True)
class TrainingMethod:
    """A training method for one training split (see the module docstring)."""

    name: str
    plan: groups.BatchPlan
    config: ml_collections.ConfigDict
    example_weights: np.ndarray | None = None  # JTT, ratio_weighted: each training example's sampling weight
    pseudo_groups: pseudo_groups.PseudoGroups | None = None  # GERNE on pseudo-groups: the training groups

    @property
    def rows(self) -> tuple[int, ...]:
        """The rows of the paired draws a step trains on (JTT's single row is its own upsampled draw)."""
        if self.name == "group_dro" and self.config.method.group_dro.sampling == "balanced":
            return (LESS_BIASED,)
        return (BIASED,) if self.name in ("erm", "group_dro", "jtt", "ratio_weighted") else (BIASED, LESS_BIASED)

    @property
    def uses_groups(self) -> bool:
        """Whether the step needs each example's group id in the batch (`batch["group"]`)."""
        return self.name == "group_dro"

    @property
    def paired(self) -> bool:
        return len(self.rows) == 2

    @property
    def examples_per_step(self) -> int:
        return len(self.rows) * self.plan.batch_size

    def optimizer(self) -> optax.GradientTransformationExtraArgs:
        return make_optimizer(self.config)

    def train_step(self, model: resnet.ResNet, mesh: Mesh) -> train_step.StepFn:
        fold = self.paired and self.config.method.fold_beta_into_loss
        return train_step.make_train_step(
            model, mesh, paired=self.paired, fold_beta=beta_schedule(self.config) if fold else None,
            divide_loss_by_num_classes=self.config.method.divide_loss_by_num_classes,
            objective=self.robust_loss() if self.name == "group_dro" else None,
            deterministic_reduction=self.config.mesh.deterministic_reduction)

    def robust_loss(self) -> group_dro.RobustLoss:
        """GroupDRO's objective for these training groups."""
        settings = self.config.method.group_dro
        names = [self.plan.group_name(y, a) for y in range(self.plan.num_classes)
                 for a in range(self.plan.num_attributes)]
        return group_dro.RobustLoss(eta=float(settings.eta), group_names=names,
                                    adjustment=group_dro.adjustments(self.plan.group_counts, settings.adjustment))

    def describe(self) -> str:
        plan = self.plan.describe()
        n = self.plan.batch_size
        if self.name == "gerne":
            return plan if self.pseudo_groups is None else f"{plan}\n{self.pseudo_groups.describe()}"
        if self.name == "group_dro":
            settings = self.config.method.group_dro
            batch = "the less-biased batch (c = 1: group-balanced)" if self.rows == (LESS_BIASED,) else (
                "the biased batch (natural group shares within each class)")
            return (f"{plan}\nGroupDRO trains on {batch} alone ({n} examples per step), eta = "
                    f"{settings.eta:g}, group adjustment C = {settings.adjustment:g}.")
        if self.name == "jtt":
            upweighted = int(np.sum(self.example_weights > 1))
            return (f"{plan}\nJTT trains on one class-balanced batch ({n} examples per step) drawn with the "
                    f"identification run's {upweighted} misclassified training examples (of "
                    f"{self.example_weights.size}) upweighted x {self.config.method.jtt.upweight:g}.")
        if self.name == "ratio_weighted":
            return (f"{plan}\nratio_weighted trains on one class-balanced batch ({n} examples per step), each "
                    "example drawn with weight 1 / (density of its tissue ratio within its class, bandwidth "
                    f"{self.config.method.ratio_weighted.bandwidth:g}); the taus only name the groups.")
        return f"{plan}\nERM trains on the biased batch alone ({n} examples per step)."


def from_config(config: ml_collections.ConfigDict, label: np.ndarray, attribute: np.ndarray,
                jtt_errors: np.ndarray | None = None, pseudo: pseudo_groups.PseudoGroups | None = None,
                tissue_ratio: np.ndarray | None = None) -> TrainingMethod:
    """The configured method for a training split with these labels and attribute bins.

    `jtt_errors` is JTT's error set on this split (`jtt.identification_errors`), needed by `jtt` only.
    `pseudo` are GERNE's pseudo-groups of this split (`pseudo_groups.from_scoring_run`), given when
    `attribute` is `pseudo.attribute`: the plan then names their two bins. `tissue_ratio` is the
    split's tissue ratios, needed by `ratio_weighted` only.
    Raises ConfigError naming the config key at fault (for GERNE's batch plan with the allowed range
    on the first line and the alpha table below).
    """
    name = config.method.name
    if name not in METHOD_NAMES:
        raise ConfigError(f"config method.name must be one of {METHOD_NAMES}, got {name!r}")
    if name == "dfr":
        raise ValueError("DFR takes no training steps: gerne_jax.methods.dfr.train_last_layer runs it")
    bin_names = pseudo_groups.BIN_NAMES if pseudo is not None else dataset.tissue_bin_names(config.data.taus)
    counts = dataset.group_counts(label, attribute, len(dataset.CLASS_NAMES), len(bin_names))
    c, weights = config.method.c, None
    if name == "group_dro":
        settings = config.method.group_dro
        if settings.sampling not in GROUP_DRO_SAMPLING:
            raise ConfigError(f"config method.group_dro.sampling must be one of {GROUP_DRO_SAMPLING}, "
                              f"got {settings.sampling!r}")
        if not (np.isfinite(settings.eta) and settings.eta >= 0):
            raise ConfigError(f"config method.group_dro.eta = {settings.eta} must be a number >= 0")
        if not (np.isfinite(settings.adjustment) and settings.adjustment >= 0):
            raise ConfigError(f"config method.group_dro.adjustment = {settings.adjustment} must be a number >= 0")
        c = 1.0  # the balanced row; the natural row does not depend on c
    if name == "jtt":
        if jtt_errors is None or np.shape(jtt_errors) != np.shape(label):
            raise ValueError("JTT needs the identification run's error set on the training split "
                             "(jtt.identification_errors)")
        weights = jtt.example_weights(jtt_errors, config.method.jtt.upweight)
    if name == "ratio_weighted":
        if tissue_ratio is None or np.shape(tissue_ratio) != np.shape(label):
            raise ValueError("ratio_weighted needs the training split's tissue ratios")
        weights = ratio_weighting.inverse_density_weights(tissue_ratio, label, len(dataset.CLASS_NAMES),
                                                          config.method.ratio_weighted.bandwidth)
    # Only GERNE extrapolates; the other methods' plans use beta = 0 (any valid value would do).
    plan = groups.make_batch_plan(
        counts, c=c, beta=config.method.beta if name == "gerne" else 0.0,
        batch_per_group=config.training.batch_per_group, corr=config.method.corr,
        empty_group=config.method.empty_group, class_names=dataset.CLASS_NAMES,
        bin_names=bin_names)
    return TrainingMethod(name=name, plan=plan, config=config, example_weights=weights, pseudo_groups=pseudo)
