"""The train step: a jitted, mesh-sharded update of the train state from one training batch.

A training batch is `{"image": [R, N, H, W, C] float32, "label": [R, N] int32}`: R = 2 for GERNE's pair
(row 0 the biased batch, row 1 the less-biased one) and R = 1 for single-batch methods (ERM). The step
shards the batch, applies the update and adds the common metrics; the training method supplies its
gradient function (`make_train_step(model, mesh, gradients, ...)`, `gerne_jax.train.method`), one of
the four kinds here or its own (a `GradientFn` over the step's building blocks, `StepOps`):

- single batch (`single_batch`): the gradient of the batch's loss.
- two gradients (`two_gradients`): the per-batch gradients g_b and g_lb in one jitted pass; the optimiser's first link
  `extrapolation.extrapolate` combines them into g_lb + beta (g_lb - g_b) (`biased_updates=g_b`).
  The metrics report both gradient norms and their cosine.
- folded (`folded(beta)`): one gradient of (1 + beta) L_lb - beta L_b, which equals the extrapolated gradient at the
  cost of one backward pass; the per-batch gradient metrics are NaN. Its loss weights use the same
  beta schedule the optimiser was built with (the method builds both).
- objective (`objective(loss)`, a single batch with group ids `"group": [1, N] int32`, GroupDRO): the gradient of a loss
  the method computes from the per-example cross-entropies and groups (`objective`), which also hands
  the optimiser extra arguments (GroupDRO's new group weights) and adds metrics.

The learning rate and beta in the metrics are read back from the optimiser state. How the forward
pass treats the two batches depends on the model's `norm` (docs/design.md §4):

- "frozen", "group": samples are independent of their batch; the two gradients come from one
  forward and one backward pass per batch (two `value_and_grad` calls in the one jitted step), so the
  step does ERM's work on the same 2N images. (A `vmap` over the pair would batch every weight
  gradient over both of its operands, which XLA lowers to grouped convolutions: on a CPU 1.7-2.6 x
  the ERM step for the tiny model.) The folded path vmaps the forward pass over the pair instead,
  which XLA folds into one pass of 2N images.
- "separate": the same two passes; train-mode BatchNorm normalises each batch by its own
  statistics. The running statistics move towards the mean of the two batches' statistics
  (mean of the two means, mean of the two variances), i.e. one update per step.
- "shared": one forward pass over the concatenated 2N images (statistics of both batches
  together, one running-statistics update) and the two gradients by a VJP vmapped over the two
  losses' cotangents. Through the common statistics each loss reaches every image, so this needs
  two full backward passes: about 5/3 of ERM's work (one forward, two backward passes of twice
  its cost each, against one of each).

Data parallelism (`gerne_jax.core.sharding`): `jax.jit` over a mesh with one axis "data"; batches sharded
on N (axis 1), state replicated and donated. Inside, the step is a `shard_map`: each device runs the
body on its N / D examples of each batch; losses and accuracies are averaged over "data" (so gradients
are those of the global mean loss, JAX inserting the gradient all-reduce), and train-mode BatchNorm
averages its statistics over "data" too. The sharded step therefore computes the single-device step.
(Plain GSPMD partitioning would gather the batch: `vmap` over the pair axis merges [2, N] into one 2N
batch, whose sharding on N it cannot express.) No TensorFlow here.

Deterministic reduction (`deterministic_reduction=True`, config `mesh.deterministic_reduction`): an
all-reduce may group the devices' values differently depending on how the devices are split over
processes (gloo's cross-process sum differs from the in-process one by an ulp), so one process of 4
devices and 2 processes of 2 devices end a few steps apart by ~1e-7. With this option each device
differentiates its own shard's loss (the parameters cast to "varying" over "data"), and every
reduction of the step -- gradients, losses, accuracies, an objective's sums -- is an all-gather
followed by a sum in device order (`sharding.ordered_sum`): as far as reductions go, the result
depends on the mesh's devices and the global batch only (docs/scaling.md "Multi-host training": each device's
own kernels must be reproducible too). Train-mode BatchNorm reduces its statistics inside Flax with an all-reduce,
so it is refused (`check_reduction`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec

from gerne_jax.core import sharding
from gerne_jax.core.errors import ConfigError
from gerne_jax.data.groups import BIASED, LESS_BIASED
from gerne_jax.models.resnet import NORM_MODES, TRAIN_MODE_BATCH_NORM, ResNet
from gerne_jax.train import extrapolation
from gerne_jax.train.train_state import TrainState

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
StepFn = Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
# (per-example losses [n], group ids [n], optimiser state, sum of a pytree over the devices' shards)
# -> (loss, optimiser args, metrics)
Objective = Callable[[jax.Array, jax.Array, Any, Callable[[Any], Any]], tuple[jax.Array, dict[str, Any], Metrics]]


def classification_loss(logits: jax.Array, labels: jax.Array,
                        divide_by_num_classes: bool = True) -> jax.Array:
    """Mean cross-entropy of one batch, divided by the number of classes K (official GERNE code)."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss / logits.shape[-1] if divide_by_num_classes else loss


def _value(schedule: optax.ScalarOrSchedule, step: jax.Array) -> jax.Array:
    return jnp.asarray(schedule(step) if callable(schedule) else schedule, jnp.float32)


def check_reduction(norm: str, deterministic_reduction: bool) -> None:
    """Refuses (ConfigError) deterministic reduction with train-mode BatchNorm, whose statistics Flax
    averages over the devices with an all-reduce that this module cannot order."""
    if deterministic_reduction and norm in TRAIN_MODE_BATCH_NORM:
        raise ConfigError(f"config mesh.deterministic_reduction = True needs a model without train-mode "
                          f"BatchNorm, but model.norm = {norm!r} averages batch statistics over the devices "
                          f"in no fixed order; use model.norm = 'group' or 'frozen'")


class StepOps(NamedTuple):
    """The sharded step's building blocks, handed to a gradient function (all run on one device's shard).

    Attributes:
      forward: `(params, batch_stats, images) -> (logits, new batch_stats)`, train mode.
      loss: `(logits, labels) -> ` the global batch's mean classification loss (`classification_loss`).
      accuracy: `(logits, labels) -> ` the global batch's accuracy.
      device_sum: sums a pytree over the devices' shards (in device order with deterministic reduction).
      differentiated_params: the parameters to differentiate (see `make_train_step`).
      reduced: the gradients of the global loss from `differentiated_params`' gradients.
      norm: the model's `norm` (docs/design.md §4).
      divide_loss_by_num_classes: whether `loss` divides by K.
    """

    forward: Callable[[Any, Any, jax.Array], tuple[jax.Array, Any]]
    loss: Callable[[jax.Array, jax.Array], jax.Array]
    accuracy: Callable[[jax.Array, jax.Array], jax.Array]
    device_sum: Callable[[Any], Any]
    differentiated_params: Callable[[Any], Any]
    reduced: Callable[[Any], Any]
    norm: str
    divide_loss_by_num_classes: bool

    @property
    def updates_stats(self) -> bool:
        return self.norm in TRAIN_MODE_BATCH_NORM


class Gradients(NamedTuple):
    """What a gradient function hands the step: the (reduced) gradients for the optimiser, its extra
    arguments, the new BatchNorm statistics, and its metrics of the updated state."""

    grads: Any
    batch_stats: Any
    metrics: Callable[[TrainState], Metrics]
    optimizer_args: Mapping[str, Any] | None = None


# (building blocks, state, this device's batch shard) -> Gradients: a training method's part of the step.
GradientFn = Callable[[StepOps, TrainState, Batch], Gradients]


def _learning_rate(state: TrainState) -> Metrics:
    return {"learning_rate": extrapolation.hyperparameters(state.opt_state)["learning_rate"]}


def single_batch(ops: StepOps, state: TrainState, batch: Batch) -> Gradients:
    """The gradient of one batch's loss (`[1, N]` batches: ERM, JTT, ratio_weighted).

    Metrics: `loss`, `accuracy`, `grad_norm`, `learning_rate`.
    """
    images, labels = batch["image"], batch["label"]
    (loss, (logits, new_stats)), grads = jax.value_and_grad(_single_batch_loss, has_aux=True)(
        ops.differentiated_params(state.params), ops, state.batch_stats, images[0], labels[0])
    grads = ops.reduced(grads)
    return Gradients(grads, new_stats, lambda new_state: {
        "loss": loss, "accuracy": ops.accuracy(logits, labels[0]), "grad_norm": optax.tree.norm(grads),
        **_learning_rate(new_state)})


def objective(loss_of: Objective) -> GradientFn:
    """A single batch with group ids (`batch["group"]`) under `loss_of`, a loss over the per-example
    cross-entropies and the groups in place of their mean (e.g. GroupDRO's `group_dro.RobustLoss`),
    which also returns the optimiser's extra arguments and metrics of its own.

    Metrics: `loss`, `accuracy`, `grad_norm`, `learning_rate` and the objective's.
    """
    def gradients(ops: StepOps, state: TrainState, batch: Batch) -> Gradients:
        images, labels, groups = batch["image"], batch["label"], batch["group"]

        def objective_loss(params):
            logits, new_stats = ops.forward(params, state.batch_stats, images[0])
            example_losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels[0])
            loss, optimizer_args, metrics = loss_of(example_losses, groups[0], state.opt_state, ops.device_sum)
            scale = 1.0 / logits.shape[-1] if ops.divide_loss_by_num_classes else 1.0
            return loss * scale, (logits, new_stats, optimizer_args, metrics)

        (loss, (logits, new_stats, optimizer_args, metrics)), grads = jax.value_and_grad(
            objective_loss, has_aux=True)(ops.differentiated_params(state.params))
        grads = ops.reduced(grads)
        return Gradients(grads, new_stats, lambda new_state: {
            "loss": loss, "accuracy": ops.accuracy(logits, labels[0]), "grad_norm": optax.tree.norm(grads),
            **_learning_rate(new_state), **metrics}, optimizer_args)

    return gradients


def two_gradients(ops: StepOps, state: TrainState, batch: Batch) -> Gradients:
    """GERNE's pair: the per-batch gradients g_b and g_lb, combined by the optimiser's first link
    (`extrapolation.extrapolate`, `biased_updates=g_b`).

    Metrics: `loss_biased`, `loss_less_biased`, `accuracy_biased`, `accuracy_less_biased`,
    `grad_norm_biased`, `grad_norm_less_biased`, `grad_cosine`, `grad_norm` (of the extrapolated
    gradient, before weight decay), `learning_rate`, `beta`.
    """
    images, labels = batch["image"], batch["label"]
    losses, (logits, new_stats), g_b, g_lb = _paired_gradients(
        ops, ops.differentiated_params(state.params), state.batch_stats, images, labels)
    g_b, g_lb = ops.reduced(g_b), ops.reduced(g_lb)

    def metrics(new_state: TrainState) -> Metrics:
        grad_metrics = _pair_gradient_metrics(g_b, g_lb, extrapolation.hyperparameters(new_state.opt_state)["beta"])
        return _pair_metrics(ops, new_state, losses, logits, labels, grad_metrics)

    return Gradients(g_lb, new_stats, metrics, {"biased_updates": g_b})


def folded(beta: optax.ScalarOrSchedule) -> GradientFn:
    """GERNE's pair folded into one gradient of (1 + beta) L_lb - beta L_b, with this beta (the schedule
    the optimiser was built with). Metrics: `two_gradients`', with `grad_norm_biased`,
    `grad_norm_less_biased` and `grad_cosine` NaN."""
    def gradients(ops: StepOps, state: TrainState, batch: Batch) -> Gradients:
        images, labels = batch["image"], batch["label"]
        beta_t = _value(beta, state.step)
        weights = jnp.zeros(2).at[BIASED].set(-beta_t).at[LESS_BIASED].set(1.0 + beta_t)

        def folded_loss(params):
            losses, aux = _paired_losses(ops, params, state.batch_stats, images, labels)
            return jnp.dot(weights, losses), (losses, aux)

        (_, (losses, (logits, new_stats))), grads = jax.value_and_grad(folded_loss, has_aux=True)(
            ops.differentiated_params(state.params))
        grads = ops.reduced(grads)

        def metrics(new_state: TrainState) -> Metrics:
            nan = jnp.full([], jnp.nan)
            grad_metrics = {"grad_norm_biased": nan, "grad_norm_less_biased": nan, "grad_cosine": nan,
                            "grad_norm": optax.tree.norm(grads)}
            return _pair_metrics(ops, new_state, losses, logits, labels, grad_metrics)

        return Gradients(grads, new_stats, metrics)

    return gradients


def _single_batch_loss(params, ops: StepOps, batch_stats, images, labels):
    logits, new_stats = ops.forward(params, batch_stats, images)
    return ops.loss(logits, labels), (logits, new_stats)


def _paired_losses(ops: StepOps, params, batch_stats, images, labels):
    """Both batches' losses [2], logits [2, N, K] and the step's new BatchNorm statistics."""
    if ops.norm == "shared":
        pairs, n = images.shape[:2]
        logits, new_stats = ops.forward(params, batch_stats, images.reshape(pairs * n, *images.shape[2:]))
        logits = logits.reshape(pairs, n, -1)
        return jax.vmap(ops.loss)(logits, labels), (logits, new_stats)
    losses, (logits, per_batch_stats) = jax.vmap(
        lambda p, s, x, y: _single_batch_loss(p, ops, s, x, y), in_axes=(None, None, 0, 0))(
        params, batch_stats, images, labels)
    return losses, (logits, _merge_batch_stats(per_batch_stats, batch_stats, ops.updates_stats))


def _paired_gradients(ops: StepOps, params, batch_stats, images, labels):
    """Losses [2], (logits [2, N, K], the step's new statistics), g_b and g_lb."""
    if ops.norm == "shared":
        losses, vjp_fn, aux = jax.vjp(
            lambda p: _paired_losses(ops, p, batch_stats, images, labels), params, has_aux=True)
        (grads,) = jax.vmap(vjp_fn)(jnp.eye(2, dtype=losses.dtype))
        return (losses, aux, jax.tree.map(lambda g: g[BIASED], grads),
                jax.tree.map(lambda g: g[LESS_BIASED], grads))
    # Each batch's loss depends on that batch alone: one forward and backward pass per batch. A
    # vmap over the pair would batch each weight gradient over both operands, which XLA lowers to
    # grouped convolutions (on a CPU 1.7-2.6 x ERM for the tiny model); two plain passes cost ERM's.
    grad_fn = jax.value_and_grad(_single_batch_loss, has_aux=True)
    values, grads = zip(*(grad_fn(params, ops, batch_stats, images[r], labels[r]) for r in range(2)))
    losses, (logits, per_batch_stats) = jax.tree.map(lambda *rows: jnp.stack(rows), *values)
    return (losses, (logits, _merge_batch_stats(per_batch_stats, batch_stats, ops.updates_stats)),
            grads[BIASED], grads[LESS_BIASED])


def _pair_metrics(ops: StepOps, state: TrainState, losses: jax.Array, logits: jax.Array, labels: jax.Array,
                  grad_metrics: Metrics) -> Metrics:
    return {"loss_biased": losses[BIASED], "loss_less_biased": losses[LESS_BIASED],
            "accuracy_biased": ops.accuracy(logits[BIASED], labels[BIASED]),
            "accuracy_less_biased": ops.accuracy(logits[LESS_BIASED], labels[LESS_BIASED]),
            **grad_metrics, **extrapolation.hyperparameters(state.opt_state)}


def make_train_step(model: ResNet, mesh: Mesh, gradients: GradientFn, *, rows: int, with_groups: bool = False,
                    divide_loss_by_num_classes: bool = True, deterministic_reduction: bool = False) -> StepFn:
    """Returns the jitted `train_step(state, batch) -> (state, metrics)` for `model`; donates `state`.

    Args:
      model: the model the state was created with; its `norm` selects the forward scheme.
      mesh: a mesh with axis "data" (`sharding.make_mesh`); the batch is sharded on N over it and the
        state replicated (`sharding.shard_batch` / `sharding.replicate` place inputs so).
      gradients: the training method's gradient function (`single_batch`, `two_gradients`,
        `folded(beta)`, `objective(loss)` or one of its own), run on each device's shard.
      rows: the batch's rows, 2 for GERNE pairs `[2, N, ...]`, 1 for single batches `[1, N, ...]`.
      with_groups: the batch also holds each example's group id, `batch["group"]` shaped like its labels.
      divide_loss_by_num_classes: divide each batch's mean cross-entropy by K (docs/design.md §3).
      deterministic_reduction: sum every cross-device reduction in device order, so the step's result
        does not depend on how the mesh's devices are split over processes (bit-identical parameters).
        Costs memory: during the reduction each device holds one gradient per device of the mesh
        (all-gather, then sum), fine for a few devices, not for a pod. Not with train-mode BatchNorm
        (ConfigError).

    Metrics: the gradient function's (see each), and `param_norm`, the norm of the updated parameters
    (the loop checks it before saving a state).
    """
    norm = model.norm
    if norm not in NORM_MODES:
        raise ValueError(f"model.norm must be one of {NORM_MODES}, got {norm!r}")
    if rows not in (1, 2):
        raise ValueError(f"rows must be 1 (a single batch) or 2 (a pair), got {rows}")
    check_reduction(norm, deterministic_reduction)
    updates_stats = norm in TRAIN_MODE_BATCH_NORM
    if updates_stats:  # statistics over the whole (global) batch, not one device's shard
        model = model.clone(batch_norm_axis_name=sharding.DATA_AXIS)

    def forward(params, batch_stats, images):
        """Train-mode logits of one image batch and the BatchNorm statistics it produces."""
        variables = {"params": params, "batch_stats": batch_stats} if batch_stats else {
            "params": params}
        if updates_stats:
            logits, mutated = model.apply(variables, images, train=True, mutable=["batch_stats"])
            return logits, mutated["batch_stats"]
        return model.apply(variables, images, train=True), batch_stats

    def device_sum(tree):
        """A pytree summed over the devices' shards: in device order, or by the all-reduce."""
        if deterministic_reduction:
            return sharding.ordered_sum(tree, sharding.DATA_AXIS)
        return jax.lax.psum(tree, sharding.DATA_AXIS)

    def device_mean(x):
        return device_sum(x) / mesh.size

    def differentiated_params(params):
        """The parameters to differentiate: per-device ("varying") when the step sums the gradients
        itself, else the replicated ones (JAX then inserts the gradient all-reduce)."""
        return jax.lax.pcast(params, sharding.DATA_AXIS, to="varying") if deterministic_reduction else params

    def reduced(grads):
        """The gradients of the global loss from `differentiated_params`' parameters."""
        return device_sum(grads) if deterministic_reduction else grads

    def loss_fn(logits, labels):
        return device_mean(classification_loss(logits, labels, divide_loss_by_num_classes))

    def accuracy(logits, labels):
        return device_mean(jnp.mean(jnp.argmax(logits, axis=-1) == labels))

    ops = StepOps(forward=forward, loss=loss_fn, accuracy=accuracy, device_sum=device_sum,
                  differentiated_params=differentiated_params, reduced=reduced, norm=norm,
                  divide_loss_by_num_classes=divide_loss_by_num_classes)

    def local_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        """The step on this device's shard of the batch (all results replicated)."""
        update = gradients(ops, state, batch)
        state = state.apply_gradients(grads=update.grads, optimizer_args=update.optimizer_args,
                                      batch_stats=update.batch_stats)
        return state, {**update.metrics(state), "param_norm": optax.tree.norm(state.params)}

    replicated = PartitionSpec()
    sharded_step = jax.shard_map(local_step, mesh=mesh,
                                 in_specs=(replicated, sharding.batch_sharding(mesh).spec),
                                 out_specs=(replicated, replicated))

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        _check_batch(batch["image"], batch["label"], rows, mesh.size)
        if with_groups and ("group" not in batch or batch["group"].shape != batch["label"].shape):
            raise ValueError("this step needs batch['group'] shaped like batch['label'] "
                             f"{batch['label'].shape}")
        return sharded_step(state, batch)

    return jax.jit(train_step, in_shardings=(sharding.replicated_sharding(mesh), sharding.batch_sharding(mesh)),
                   out_shardings=(sharding.replicated_sharding(mesh), sharding.replicated_sharding(mesh)),
                   donate_argnums=0)


def _merge_batch_stats(per_batch_stats: Any, old_stats: Any, updates_stats: bool) -> Any:
    """One running-statistics update from the vmapped pair: the mean of the two batches' updates.

    Each batch's update is m * old + (1 - m) * its statistics, so their mean is the update with the
    mean of the two batches' means and variances.
    """
    if not updates_stats:
        return old_stats
    return jax.tree.map(lambda s: jnp.mean(s, axis=0), per_batch_stats)


def _pair_gradient_metrics(g_b: Any, g_lb: Any, beta: jax.Array) -> Metrics:
    sq_b, sq_lb, dot = optax.tree.vdot(g_b, g_b), optax.tree.vdot(g_lb, g_lb), optax.tree.vdot(g_b, g_lb)
    # |g_lb + beta (g_lb - g_b)|^2 expanded, so g_ext is not materialised again.
    sq_ext = (1 + beta) ** 2 * sq_lb - 2 * beta * (1 + beta) * dot + beta**2 * sq_b
    return {"grad_norm_biased": jnp.sqrt(sq_b), "grad_norm_less_biased": jnp.sqrt(sq_lb),
            "grad_cosine": dot / jnp.sqrt(sq_b * sq_lb),
            "grad_norm": jnp.sqrt(jnp.maximum(sq_ext, 0.0))}


def _check_batch(images: jax.Array, labels: jax.Array, rows: int, num_devices: int) -> None:
    if images.ndim != 5 or images.shape[0] != rows:
        expected = "[2, N, H, W, C] (biased, less-biased)" if rows == 2 else "[1, N, H, W, C] (a single batch)"
        raise ValueError(f"batch['image'] must be {expected} for this step, got shape {images.shape}")
    if images.shape[1] % num_devices:
        raise ValueError(f"batch size N = {images.shape[1]} must be a multiple of the "
                         f"{num_devices} devices of the mesh")
    if labels.shape != images.shape[:2]:
        raise ValueError(f"batch['label'] must have shape {images.shape[:2]} to match "
                         f"batch['image'] {images.shape}, got {labels.shape}")
