"""`model.dtype = bfloat16`: a short run of the tiny ResNet in bfloat16 follows the float32 run.

Both runs start from the same float32 parameters and see the same GERNE pairs (two-gradient step,
train-mode BatchNorm shared by the pair, SGD with momentum). Tolerances, stated once here: bfloat16 keeps
8 significant bits (relative rounding 2^-9, about 0.2 %) in each product, so the first loss (same
parameters) agrees to 1 %. The rounding differences then feed back through the updates, so the runs
drift apart slowly: each step's loss stays within STEP_LOSS_TOLERANCE of the float32 run's (a fifth of the
initial loss), their mean absolute difference over the run within MEAN_LOSS_TOLERANCE, and the final
accuracy on the whole training set within ACCURACY_TOLERANCE (5 percentage points, 6 of the 128 images).
Parameters, optimiser state and BatchNorm statistics stay float32.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gerne_jax.core import sharding
from gerne_jax.evaluation import forward
from gerne_jax.models import resnet
from gerne_jax.train import extrapolation, train_state
from gerne_jax.train import train_step as ts
from tests.helpers import tiny_split

TRAIN_STEPS, N = 25, 16
STEP_LOSS_TOLERANCE = 0.05     # absolute, on a loss divided by K = 2 (about 0.25 at the start)
MEAN_LOSS_TOLERANCE = 0.02
ACCURACY_TOLERANCE = 0.05


def _data() -> dict[str, np.ndarray]:
    """128 learnable 8x8x3 patches (tumour signature in channel 0), standardised per channel."""
    split = tiny_split(np.random.default_rng(1), 128, "mp")
    image = split["image"].astype(np.float32)
    image = (image - image.mean(axis=(0, 1, 2))) / image.std(axis=(0, 1, 2))
    return {"image": image, "label": split["label"].astype(np.int32)}


def _pairs(data: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """TRAIN_STEPS paired batches [2, N, ...] drawn at random (the same for both dtypes)."""
    rng = np.random.default_rng(2)
    indices = [rng.choice(len(data["label"]), size=(2, N), replace=False) for _ in range(TRAIN_STEPS)]
    return [{key: value[index] for key, value in data.items()} for index in indices]


@functools.cache
def _run(dtype: str) -> dict:
    data = _data()
    model = resnet.create_model("tiny", num_classes=2, norm="shared", dtype=dtype)
    mesh = sharding.make_mesh(1)
    tx = extrapolation.make_optimizer(0.02, 0.5, momentum=0.9, weight_decay=1e-4)
    float32_model = resnet.create_model("tiny", num_classes=2, norm="shared")
    variables = train_state.init_variables(jax.random.key(0), float32_model, (1, 8, 8, 3))
    state = train_state.create_train_state(jax.random.key(0), model, (1, 8, 8, 3), tx, variables)
    step = ts.make_train_step(model, mesh, ts.two_gradients, rows=2)
    losses = []
    for batch in _pairs(data):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss_less_biased"]))
    # The images are standardised already: mean 0 and std 1 leave them as they are.
    probabilities = forward.probabilities(model, {"params": state.params, "batch_stats": state.batch_stats},
                                          data["image"], jnp.zeros(3), jnp.ones(3))
    accuracy = float(np.mean(np.argmax(probabilities, axis=-1) == data["label"]))
    return {"losses": np.asarray(losses), "accuracy": accuracy, "state": state,
            "probabilities_dtype": probabilities.dtype}


@pytest.mark.slow
def test_bfloat16_run_follows_float32_run():
    f32, bf16 = _run("float32"), _run("bfloat16")
    assert f32["accuracy"] >= 0.9, "the float32 reference run must learn the data for the comparison to mean anything"
    assert np.mean(f32["losses"][-5:]) < 0.5 * f32["losses"][0]
    np.testing.assert_allclose(bf16["losses"][0], f32["losses"][0], rtol=0.01)
    np.testing.assert_allclose(bf16["losses"], f32["losses"], atol=STEP_LOSS_TOLERANCE)
    assert np.mean(np.abs(bf16["losses"] - f32["losses"])) <= MEAN_LOSS_TOLERANCE
    assert abs(bf16["accuracy"] - f32["accuracy"]) <= ACCURACY_TOLERANCE
    assert bf16["probabilities_dtype"] == jnp.float32


@pytest.mark.slow
def test_bfloat16_keeps_float32_parameters_optimizer_state_and_statistics():
    state = _run("bfloat16")["state"]
    for name, tree in (("params", state.params), ("opt_state", state.opt_state),
                       ("batch_stats", state.batch_stats)):
        dtypes = {leaf.dtype for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)}
        assert dtypes == {jnp.dtype(jnp.float32)}, f"{name}: {dtypes}"
    # The computation itself runs in bfloat16: a forward pass's activations are bfloat16.
    model = resnet.create_model("tiny", num_classes=2, norm="shared", dtype="bfloat16")
    _, intermediates = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                                   jnp.zeros((1, 8, 8, 3)), capture_intermediates=True,
                                   mutable=["intermediates"])
    assert intermediates["intermediates"]["layer1_0"]["__call__"][0].dtype == jnp.bfloat16
