"""The train step: a jitted, mesh-sharded update of the train state from one training batch.

A training batch is `{"image": [R, N, H, W, C] float32, "label": [R, N] int32}`: R = 2 for GERNE's pair
(row 0 the biased batch, row 1 the less-biased one) and R = 1 for single-batch methods (ERM). Four
kinds of step, chosen by the training method (`gerne_jax.methods.training_method`):

- single batch: the gradient of the batch's loss.
- two gradients: the per-batch gradients g_b and g_lb in one jitted pass; the optimiser's first link
  `extrapolation.extrapolate` combines them into g_lb + beta (g_lb - g_b) (`biased_updates=g_b`).
  The metrics report both gradient norms and their cosine.
- folded: one gradient of (1 + beta) L_lb - beta L_b, which equals the extrapolated gradient at the
  cost of one backward pass; the per-batch gradient metrics are NaN. Its loss weights use the same
  beta schedule the optimiser was built with (the method builds both).
- objective (a single batch with group ids `"group": [1, N] int32`, GroupDRO): the gradient of a loss
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
from typing import Any

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


def make_train_step(model: ResNet, mesh: Mesh, *, paired: bool,
                    fold_beta: optax.ScalarOrSchedule | None = None,
                    divide_loss_by_num_classes: bool = True,
                    objective: Objective | None = None,
                    deterministic_reduction: bool = False) -> StepFn:
    """Returns the jitted `train_step(state, batch) -> (state, metrics)` for `model`; donates `state`.

    Args:
      model: the model the state was created with; its `norm` selects the forward scheme.
      mesh: a mesh with axis "data" (`sharding.make_mesh`); the batch is sharded on N over it and the
        state replicated (`sharding.shard_batch` / `sharding.replicate` place inputs so).
      paired: batches are GERNE pairs `[2, N, ...]`; otherwise single batches `[1, N, ...]`.
      fold_beta: for a paired step, the folded one-gradient path with this beta (the schedule the
        optimiser was built with); None computes both per-batch gradients.
      divide_loss_by_num_classes: divide each batch's mean cross-entropy by K (docs/design.md §3).
      objective: for a single-batch step, a loss over the per-example cross-entropies and the batch's
        group ids (`batch["group"]`) in place of their mean, e.g. `group_dro.RobustLoss`; it also
        returns the optimiser's extra arguments and metrics of its own.
      deterministic_reduction: sum every cross-device reduction in device order, so the step's result
        does not depend on how the mesh's devices are split over processes (bit-identical parameters).
        Costs memory: during the reduction each device holds one gradient per device of the mesh
        (all-gather, then sum), fine for a few devices, not for a pod. Not with train-mode BatchNorm
        (ConfigError).

    Metrics of a paired batch: `loss_biased`, `loss_less_biased`, `accuracy_biased`,
    `accuracy_less_biased`, `grad_norm_biased`, `grad_norm_less_biased`, `grad_cosine` (the three
    NaN on the folded path), `grad_norm` (of the extrapolated gradient, before weight decay),
    `learning_rate`, `beta`. Of a single batch: `loss`, `accuracy`, `grad_norm`, `learning_rate`. Both:
    `param_norm`, the norm of the updated parameters (the loop checks it before saving a state).
    """
    norm = model.norm
    if norm not in NORM_MODES:
        raise ValueError(f"model.norm must be one of {NORM_MODES}, got {norm!r}")
    if fold_beta is not None and not paired:
        raise ValueError("fold_beta folds the pair's two losses; a single-batch step has one")
    if objective is not None and paired:
        raise ValueError("an objective replaces a single batch's loss; a paired step has two")
    check_reduction(norm, deterministic_reduction)
    rows = 2 if paired else 1
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

    def single_batch_loss(params, batch_stats, images, labels):
        logits, new_stats = forward(params, batch_stats, images)
        return loss_fn(logits, labels), (logits, new_stats)

    def paired_losses(params, batch_stats, images, labels):
        """Both batches' losses [2], logits [2, N, K] and the step's new BatchNorm statistics."""
        if norm == "shared":
            pairs, n = images.shape[:2]
            logits, new_stats = forward(params, batch_stats, images.reshape(pairs * n, *images.shape[2:]))
            logits = logits.reshape(pairs, n, -1)
            return jax.vmap(loss_fn)(logits, labels), (logits, new_stats)
        losses, (logits, per_batch_stats) = jax.vmap(
            single_batch_loss, in_axes=(None, None, 0, 0))(params, batch_stats, images, labels)
        return losses, (logits, _merge_batch_stats(per_batch_stats, batch_stats, updates_stats))

    def paired_gradients(params, batch_stats, images, labels):
        """Losses [2], (logits [2, N, K], the step's new statistics), g_b and g_lb."""
        if norm == "shared":
            losses, vjp_fn, aux = jax.vjp(
                lambda p: paired_losses(p, batch_stats, images, labels), params, has_aux=True)
            (grads,) = jax.vmap(vjp_fn)(jnp.eye(2, dtype=losses.dtype))
            return (losses, aux, jax.tree.map(lambda g: g[BIASED], grads),
                    jax.tree.map(lambda g: g[LESS_BIASED], grads))
        # Each batch's loss depends on that batch alone: one forward and backward pass per batch. A
        # vmap over the pair would batch each weight gradient over both operands, which XLA lowers to
        # grouped convolutions (on a CPU 1.7-2.6 x ERM for the tiny model); two plain passes cost ERM's.
        grad_fn = jax.value_and_grad(single_batch_loss, has_aux=True)
        values, grads = zip(*(grad_fn(params, batch_stats, images[r], labels[r]) for r in range(2)))
        losses, (logits, per_batch_stats) = jax.tree.map(lambda *rows: jnp.stack(rows), *values)
        return (losses, (logits, _merge_batch_stats(per_batch_stats, batch_stats, updates_stats)),
                grads[BIASED], grads[LESS_BIASED])

    def single_step(state: TrainState, images: jax.Array, labels: jax.Array) -> tuple[TrainState, Metrics]:
        (loss, (logits, new_stats)), grads = jax.value_and_grad(single_batch_loss, has_aux=True)(
            differentiated_params(state.params), state.batch_stats, images[0], labels[0])
        grads = reduced(grads)
        state = state.apply_gradients(grads=grads, batch_stats=new_stats)
        return state, {"loss": loss, "accuracy": accuracy(logits, labels[0]),
                       "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(state.params),
                       "learning_rate": extrapolation.hyperparameters(state.opt_state)["learning_rate"]}

    def objective_step(state: TrainState, images: jax.Array, labels: jax.Array,
                       groups: jax.Array) -> tuple[TrainState, Metrics]:
        """A single batch under `objective` (its group weights and the like read from the optimiser state)."""
        def objective_loss(params):
            logits, new_stats = forward(params, state.batch_stats, images[0])
            example_losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels[0])
            loss, optimizer_args, metrics = objective(example_losses, groups[0], state.opt_state, device_sum)
            scale = 1.0 / logits.shape[-1] if divide_loss_by_num_classes else 1.0
            return loss * scale, (logits, new_stats, optimizer_args, metrics)

        (loss, (logits, new_stats, optimizer_args, metrics)), grads = jax.value_and_grad(
            objective_loss, has_aux=True)(differentiated_params(state.params))
        grads = reduced(grads)
        state = state.apply_gradients(grads=grads, optimizer_args=optimizer_args, batch_stats=new_stats)
        return state, {"loss": loss, "accuracy": accuracy(logits, labels[0]),
                       "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(state.params),
                       "learning_rate": extrapolation.hyperparameters(state.opt_state)["learning_rate"],
                       **metrics}

    def paired_step(state: TrainState, images: jax.Array, labels: jax.Array) -> tuple[TrainState, Metrics]:
        if fold_beta is not None:
            beta_t = _value(fold_beta, state.step)
            weights = jnp.zeros(2).at[BIASED].set(-beta_t).at[LESS_BIASED].set(1.0 + beta_t)

            def folded_loss(params):
                losses, aux = paired_losses(params, state.batch_stats, images, labels)
                return jnp.dot(weights, losses), (losses, aux)

            (_, (losses, (logits, new_stats))), grads = jax.value_and_grad(folded_loss, has_aux=True)(
                differentiated_params(state.params))
            grads = reduced(grads)
            state = state.apply_gradients(grads=grads, batch_stats=new_stats)
            nan = jnp.full([], jnp.nan)
            grad_metrics = {"grad_norm_biased": nan, "grad_norm_less_biased": nan, "grad_cosine": nan,
                            "grad_norm": optax.tree.norm(grads)}
        else:
            losses, (logits, new_stats), g_b, g_lb = paired_gradients(
                differentiated_params(state.params), state.batch_stats, images, labels)
            g_b, g_lb = reduced(g_b), reduced(g_lb)
            state = state.apply_gradients(grads=g_lb, optimizer_args={"biased_updates": g_b},
                                          batch_stats=new_stats)
            grad_metrics = _pair_gradient_metrics(
                g_b, g_lb, extrapolation.hyperparameters(state.opt_state)["beta"])
        metrics = {
            "loss_biased": losses[BIASED], "loss_less_biased": losses[LESS_BIASED],
            "accuracy_biased": accuracy(logits[BIASED], labels[BIASED]),
            "accuracy_less_biased": accuracy(logits[LESS_BIASED], labels[LESS_BIASED]),
            **grad_metrics, "param_norm": optax.tree.norm(state.params),
            **extrapolation.hyperparameters(state.opt_state)}
        return state, metrics

    def local_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        """The step on this device's shard of the batch (all results replicated)."""
        if objective is not None:
            return objective_step(state, batch["image"], batch["label"], batch["group"])
        step = paired_step if paired else single_step
        return step(state, batch["image"], batch["label"])

    replicated = PartitionSpec()
    sharded_step = jax.shard_map(local_step, mesh=mesh,
                                 in_specs=(replicated, sharding.batch_sharding(mesh).spec),
                                 out_specs=(replicated, replicated))

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        _check_batch(batch["image"], batch["label"], rows, mesh.size)
        if objective is not None and ("group" not in batch or batch["group"].shape != batch["label"].shape):
            raise ValueError("this step's objective needs batch['group'] shaped like batch['label'] "
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
