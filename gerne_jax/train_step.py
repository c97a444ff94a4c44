"""The GERNE train step (both per-batch gradients in one jitted pass), eval step and sharding.

A paired batch is `{"image": [2, N, H, W, C] float32, "label": [2, N] int32, "group": [2, N]}`
with index 0 the biased batch and 1 the less-biased one (`group` is carried along, unused here).
`train_step(state, batch)` computes both per-batch losses L_b, L_lb and gradients g_b, g_lb,
hands the stacked pair to the optimiser chain, whose first link `extrapolate(beta)` turns it into
g_lb + beta (g_lb - g_b) (SPEC 3), and updates BatchNorm running statistics once.

How the forward pass treats the two batches depends on the model's `norm` (SPEC 3 and 7):

- "frozen", "group": samples are independent of their batch; `vmap(value_and_grad(loss))` over
  the leading axis (XLA folds the vmapped forward into one pass of 2N images).
- "separate": the same vmap; train-mode BatchNorm under vmap normalises each batch by its own
  statistics. The running statistics move towards the mean of the two batches' statistics
  (mean of the two means, mean of the two variances), i.e. one update per step.
- "shared": one forward pass over the concatenated 2N images (statistics of both batches
  together, one running-statistics update) and the two gradients by a VJP vmapped over the two
  losses' cotangents.

`fold_beta_into_loss=True` is a faster path, valid for every norm mode: one gradient of the
combined loss (1 + beta) L_lb - beta L_b (per-example weights over the 2N examples), which equals
the extrapolated gradient. It cannot report the per-batch gradient norms or their cosine (NaN in
the metrics), and the optimiser then receives the plain extrapolated gradient, so it must be built
without `extrapolate` (`make_optimizer(..., beta=None)`).

A batch with a leading axis of size 1 (`[1, M, ...]`) is plain single-batch training (ERM on M
images); the optimiser again receives a plain gradient. ERM inside the paired setting is simply
`beta = -1`, and group resampling `beta = 0` with c = 1 in the sampler.

Data parallelism: `jax.jit` over a `Mesh` with one axis "data" (a one-device mesh when none is
given); batches sharded on N (axis 1), parameters and optimiser state replicated. Inside, the
step is a `shard_map`: each device runs the body on its N / D examples of each batch; losses and
accuracies are averaged over "data" (so gradients are those of the global mean loss, JAX inserting
the gradient all-reduce), and train-mode BatchNorm averages its statistics over "data" too. The
sharded step therefore computes the single-device step. (Plain GSPMD partitioning would gather the
batch: `vmap` over the pair axis merges [2, N] into one 2N batch, whose sharding on N it cannot
express.) No TensorFlow here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gerne_jax.extrapolation import BIASED, LESS_BIASED, extrapolate
from gerne_jax.models import NORM_MODES, TRAIN_MODE_BATCH_NORM, ResNet

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
DATA_AXIS = "data"


class TrainState(train_state.TrainState):
    """Flax TrainState plus BatchNorm running statistics (`{}` for GroupNorm models)."""

    batch_stats: Any


def init_variables(rng: jax.Array, model: ResNet, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """`model.init` for image batches of `input_shape` `(N, H, W, C)` (only C matters): params, stats."""
    if len(input_shape) != 4:
        raise ValueError(f"input_shape must be (N, H, W, C), got {tuple(input_shape)}")
    init = jax.jit(lambda key: model.init(key, jnp.zeros(input_shape, jnp.float32), train=False))
    return init(rng)


def create_train_state(rng: jax.Array, model: ResNet, input_shape: tuple[int, ...],
                       tx: optax.GradientTransformation,
                       variables: Mapping[str, Any] | None = None) -> TrainState:
    """Initialises parameters (float32), BatchNorm statistics and the optimiser state.

    Args:
      rng: PRNG key for the parameter initialisers.
      model: a `gerne_jax.models.ResNet`.
      input_shape: shape of one image batch `(N, H, W, C)`; only C matters for the parameters.
      tx: the optimiser, e.g. `make_optimizer(...)`; `tx.init` gets the plain parameters.
      variables: start from these `{"params", "batch_stats"}` (e.g. pretrained weights) instead of
        a fresh `init_variables(rng, model, input_shape)`.
    """
    if variables is None:
        variables = init_variables(rng, model, input_shape)
    return TrainState.create(apply_fn=model.apply, params=variables["params"],
                             batch_stats=variables.get("batch_stats", {}), tx=tx)


def make_optimizer(learning_rate: optax.ScalarOrSchedule, *, momentum: float = 0.9,
                   weight_decay: float = 0.0,
                   beta: optax.ScalarOrSchedule | None = None) -> optax.GradientTransformation:
    """SGD with coupled weight decay (the official GERNE optimiser), led by `extrapolate(beta)`.

    `beta=None` leaves `extrapolate` out: for the folded fast path and single-batch (ERM) steps,
    whose gradient is already a plain one.
    """
    links = [] if beta is None else [extrapolate(beta)]
    if weight_decay:
        links.append(optax.add_decayed_weights(weight_decay))
    links.append(optax.sgd(learning_rate, momentum=momentum or None))
    return optax.chain(*links)


def classification_loss(logits: jax.Array, labels: jax.Array,
                        divide_by_num_classes: bool = True) -> jax.Array:
    """Mean cross-entropy of one batch, divided by the number of classes K (official GERNE code)."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss / logits.shape[-1] if divide_by_num_classes else loss


def _value(schedule: optax.ScalarOrSchedule, step: jax.Array) -> jax.Array:
    return jnp.asarray(schedule(step) if callable(schedule) else schedule, jnp.float32)


def _tree_dot(a: Any, b: Any) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def make_train_step(model: ResNet, *, learning_rate: optax.ScalarOrSchedule,
                    beta: optax.ScalarOrSchedule = 0.0, fold_beta_into_loss: bool = False,
                    divide_loss_by_num_classes: bool = True,
                    mesh: Mesh | None = None) -> Callable[[TrainState, Batch],
                                                          tuple[TrainState, Metrics]]:
    """Returns the jitted `train_step(state, batch) -> (state, metrics)` for `model`.

    Args:
      model: the model the state was created with; its `norm` selects the forward scheme.
      learning_rate: the optimiser's learning rate or schedule (reported in the metrics).
      beta: the optimiser's extrapolation factor or schedule (reported in the metrics; used for
        the loss weights when `fold_beta_into_loss`). Must equal the `beta` given to `extrapolate`.
      fold_beta_into_loss: the one-gradient fast path (see the module docstring).
      divide_loss_by_num_classes: divide each batch's mean cross-entropy by K (SPEC 3).
      mesh: a mesh with axis "data" (`make_mesh`); the batch is sharded on N over it and the state
        replicated (`shard_batch` / `replicate` place inputs so). Default: the first device alone.

    Metrics of a paired batch: `loss_biased`, `loss_less_biased`, `accuracy_biased`,
    `accuracy_less_biased`, `grad_norm_biased`, `grad_norm_less_biased`, `grad_cosine` (the three
    NaN on the folded path), `grad_norm` (of the extrapolated gradient, before weight decay),
    `learning_rate`, `beta`. Of a single batch: `loss`, `accuracy`, `grad_norm`, `learning_rate`.
    """
    norm = model.norm
    if norm not in NORM_MODES:
        raise ValueError(f"model.norm must be one of {NORM_MODES}, got {norm!r}")
    mesh = make_mesh(1) if mesh is None else mesh
    updates_stats = norm in TRAIN_MODE_BATCH_NORM
    if updates_stats:  # statistics over the whole (global) batch, not one device's shard
        model = model.clone(batch_norm_axis_name=DATA_AXIS)

    def forward(params, batch_stats, images):
        """Train-mode logits of one image batch and the BatchNorm statistics it produces."""
        variables = {"params": params, "batch_stats": batch_stats} if batch_stats else {
            "params": params}
        if updates_stats:
            logits, mutated = model.apply(variables, images, train=True, mutable=["batch_stats"])
            return logits, mutated["batch_stats"]
        return model.apply(variables, images, train=True), batch_stats

    def loss_fn(logits, labels):
        local_loss = classification_loss(logits, labels, divide_loss_by_num_classes)
        return jax.lax.pmean(local_loss, DATA_AXIS)

    def accuracy(logits, labels):
        return jax.lax.pmean(jnp.mean(jnp.argmax(logits, axis=-1) == labels), DATA_AXIS)

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
        """Stacked gradients [2, ...] of L_b and L_lb, with losses, logits and new statistics."""
        if norm == "shared":
            losses, vjp_fn, aux = jax.vjp(
                lambda p: paired_losses(p, batch_stats, images, labels), params, has_aux=True)
            (grads,) = jax.vmap(vjp_fn)(jnp.eye(2, dtype=losses.dtype))
            return losses, aux, grads
        (losses, (logits, per_batch_stats)), grads = jax.vmap(
            jax.value_and_grad(single_batch_loss, has_aux=True),
            in_axes=(None, None, 0, 0))(params, batch_stats, images, labels)
        return losses, (logits, _merge_batch_stats(per_batch_stats, batch_stats, updates_stats)), grads

    def local_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        """The step on this device's shard of the batch (all results replicated)."""
        images, labels = batch["image"], batch["label"]
        lr = _value(learning_rate, state.step)
        if images.shape[0] == 1:
            (loss, (logits, new_stats)), grads = jax.value_and_grad(single_batch_loss, has_aux=True)(
                state.params, state.batch_stats, images[0], labels[0])
            metrics = {"loss": loss, "accuracy": accuracy(logits, labels[0]),
                       "grad_norm": optax.tree.norm(grads), "learning_rate": lr}
            return state.apply_gradients(grads=grads, batch_stats=new_stats), metrics

        beta_t = _value(beta, state.step)
        if fold_beta_into_loss:
            weights = jnp.zeros(2).at[BIASED].set(-beta_t).at[LESS_BIASED].set(1.0 + beta_t)

            def folded_loss(params):
                losses, aux = paired_losses(params, state.batch_stats, images, labels)
                return jnp.dot(weights, losses), (losses, aux)

            (_, (losses, (logits, new_stats))), grads = jax.value_and_grad(folded_loss, has_aux=True)(
                state.params)
            nan = jnp.full([], jnp.nan)
            grad_metrics = {"grad_norm_biased": nan, "grad_norm_less_biased": nan, "grad_cosine": nan,
                            "grad_norm": optax.tree.norm(grads)}
        else:
            losses, (logits, new_stats), grads = paired_gradients(
                state.params, state.batch_stats, images, labels)
            grad_metrics = _pair_gradient_metrics(grads, beta_t)
        metrics = {
            "loss_biased": losses[BIASED], "loss_less_biased": losses[LESS_BIASED],
            "accuracy_biased": accuracy(logits[BIASED], labels[BIASED]),
            "accuracy_less_biased": accuracy(logits[LESS_BIASED], labels[LESS_BIASED]),
            **grad_metrics, "learning_rate": lr, "beta": beta_t}
        return state.apply_gradients(grads=grads, batch_stats=new_stats), metrics

    replicated = PartitionSpec()
    sharded_step = jax.shard_map(local_step, mesh=mesh,
                                 in_specs=(replicated, batch_sharding(mesh).spec),
                                 out_specs=(replicated, replicated))

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        _check_batch(batch["image"], batch["label"], mesh.size)
        return sharded_step(state, batch)

    replicated_sharding = NamedSharding(mesh, replicated)
    return jax.jit(train_step, in_shardings=(replicated_sharding, batch_sharding(mesh)),
                   out_shardings=(replicated_sharding, replicated_sharding))


def _merge_batch_stats(per_batch_stats: Any, old_stats: Any, updates_stats: bool) -> Any:
    """One running-statistics update from the vmapped pair: the mean of the two batches' updates.

    Each batch's update is m * old + (1 - m) * its statistics, so their mean is the update with the
    mean of the two batches' means and variances.
    """
    if not updates_stats:
        return old_stats
    return jax.tree.map(lambda s: jnp.mean(s, axis=0), per_batch_stats)


def _pair_gradient_metrics(stacked_grads: Any, beta: jax.Array) -> Metrics:
    g_b = jax.tree.map(lambda g: g[BIASED], stacked_grads)
    g_lb = jax.tree.map(lambda g: g[LESS_BIASED], stacked_grads)
    sq_b, sq_lb, dot = _tree_dot(g_b, g_b), _tree_dot(g_lb, g_lb), _tree_dot(g_b, g_lb)
    # |g_lb + beta (g_lb - g_b)|^2 expanded, so g_ext is not materialised twice.
    sq_ext = (1 + beta) ** 2 * sq_lb - 2 * beta * (1 + beta) * dot + beta**2 * sq_b
    return {"grad_norm_biased": jnp.sqrt(sq_b), "grad_norm_less_biased": jnp.sqrt(sq_lb),
            "grad_cosine": dot / jnp.sqrt(sq_b * sq_lb),
            "grad_norm": jnp.sqrt(jnp.maximum(sq_ext, 0.0))}


def _check_batch(images: jax.Array, labels: jax.Array, num_devices: int) -> None:
    if images.ndim != 5 or images.shape[0] not in (1, 2):
        raise ValueError("batch['image'] must be [2, N, H, W, C] (biased, less-biased) or "
                         f"[1, N, H, W, C] (single batch), got shape {images.shape}")
    if images.shape[1] % num_devices:
        raise ValueError(f"batch size N = {images.shape[1]} must be a multiple of the "
                         f"{num_devices} devices of the mesh")
    if labels.shape != images.shape[:2]:
        raise ValueError(f"batch['label'] must have shape {images.shape[:2]} to match "
                         f"batch['image'] {images.shape}, got {labels.shape}")


@jax.jit
def eval_step(state: TrainState, images: jax.Array) -> jax.Array:
    """Inference-mode logits [N, K] (float32) of images [N, H, W, C]; running BatchNorm statistics."""
    variables = {"params": state.params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    return state.apply_fn(variables, images, train=False)


# ---------------------------------------------------------------------------------------------
# Sharding helpers.
# ---------------------------------------------------------------------------------------------


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh with axis "data" over the first `num_devices` devices (all when None)."""
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices must be in [1, {len(devices)}], got {num_devices}")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh, batch_axis: int = 1) -> NamedSharding:
    """Sharding that splits axis `batch_axis` (N of a paired batch) over the "data" axis."""
    return NamedSharding(mesh, PartitionSpec(*([None] * batch_axis), DATA_AXIS))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh,
                batch_axis: int = 1) -> dict[str, jax.Array]:
    """Process-local numpy arrays -> global jax.Arrays sharded on `batch_axis` (multi-host ready).

    Each process passes its own slice of the global batch (the whole batch on one host). Use
    `batch_axis=1` for paired batches [2, N, ...] and `batch_axis=0` for eval images [N, ...].
    """
    sharding = batch_sharding(mesh, batch_axis)
    local_devices = len(mesh.local_devices)
    for name, value in batch.items():
        size = np.shape(value)[batch_axis] if np.ndim(value) > batch_axis else None
        if size is None or size % local_devices:
            raise ValueError(f"batch[{name!r}] with shape {np.shape(value)}: axis {batch_axis} must "
                             f"divide evenly over the {local_devices} local devices")
    return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for name, value in batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf of `tree` (e.g. a TrainState) on all devices of `mesh`, unsharded."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))
