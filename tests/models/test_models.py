"""Tests of the Flax ResNets: torchvision parameter counts and names, norm modes, dtypes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gerne_jax.models import resnet

# torchvision.models.resnet{18,34,50,101,152}(num_classes=1000): sum(p.numel() for p in parameters())
TORCHVISION_PARAMETER_COUNTS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}


def _abstract_variables(model, shape):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def _count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMETER_COUNTS))
@pytest.mark.parametrize("norm", ["frozen", "group"])
def test_parameter_count_matches_torchvision(name, norm):
    model = resnet.create_model(name, num_classes=1000, norm=norm)
    variables = _abstract_variables(model, (1, 64, 64, 3))
    assert _count(variables["params"]) == TORCHVISION_PARAMETER_COUNTS[name]
    # Running statistics are buffers in torchvision, not parameters; GroupNorm has none.
    assert ("batch_stats" in variables) == (norm == "frozen")


def test_module_names_follow_torchvision():
    variables = _abstract_variables(resnet.create_model("resnet50", num_classes=2, norm="shared"),
                                    (1, 64, 64, 3))
    params = variables["params"]
    stages = {"layer1": 3, "layer2": 4, "layer3": 6, "layer4": 3}
    expected_top = {"conv1", "bn1", "fc"} | {f"{s}_{i}" for s, n in stages.items() for i in range(n)}
    assert set(params) == expected_top
    assert set(params["layer2_0"]) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3",
                                       "downsample_conv", "downsample_bn"}
    assert "downsample_conv" not in params["layer2_1"]
    # Stride on the 3x3 conv (v1.5): conv2 of layer2_0 is 3x3 128 -> 128, conv3 expands to 512.
    assert params["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
    assert params["layer2_0"]["conv3"]["kernel"].shape == (1, 1, 128, 512)
    assert params["conv1"]["kernel"].shape == (7, 7, 3, 64)
    assert set(params["conv1"]) == {"kernel"}  # no bias
    assert params["fc"]["kernel"].shape == (2048, 2) and params["fc"]["bias"].shape == (2,)
    assert set(variables["batch_stats"]["layer2_0"]["downsample_bn"]) == {"mean", "var"}


@pytest.mark.parametrize("channels", [1, 3, 5])
def test_any_number_of_input_channels_and_output_shape(channels):
    model = resnet.create_model("resnet18", num_classes=7, norm="group")
    variables = _abstract_variables(model, (2, 32, 32, channels))
    assert variables["params"]["conv1"]["kernel"].shape == (7, 7, channels, 64)
    logits = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 32, 32, channels))), variables)
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32


def test_num_groups_is_largest_divisor_up_to_32():
    for features in [1, 6, 8, 16, 24, 48, 64, 96, 100, 2048]:
        brute = max(g for g in range(1, 33) if features % g == 0)
        assert resnet.num_groups_for(features) == brute
    assert resnet.num_groups_for(64) == 32


def test_std_conv_standardises_kernel_per_output_unit():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), jnp.float32)
    std_conv = resnet.StdConv(4, (3, 3), use_bias=False)
    variables = std_conv.init(jax.random.key(1), x)
    kernel = np.asarray(variables["params"]["kernel"], np.float64)
    standardised = (kernel - kernel.mean(axis=(0, 1, 2))) / kernel.std(axis=(0, 1, 2))
    expected = nn.Conv(4, (3, 3), use_bias=False).apply(
        {"params": {"kernel": jnp.asarray(standardised, jnp.float32)}}, x)
    np.testing.assert_allclose(std_conv.apply(variables, x), expected, rtol=1e-4, atol=1e-4)


def _tiny_variables(norm, images):
    model = resnet.create_model("tiny", num_classes=3, norm=norm)
    variables = model.init(jax.random.key(0), images[:1], train=False)
    return model, variables


def _train_logits(model, variables, images):
    if "batch_stats" in variables and model.norm != "frozen":
        apply = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[0]
    else:
        apply = lambda v, x: model.apply(v, x, train=True)
    return jax.jit(apply)(variables, images)


@pytest.mark.parametrize("norm,independent", [("frozen", True), ("group", True),
                                              ("shared", False), ("separate", False)])
def test_sample_output_depends_on_batch_only_for_train_mode_batchnorm(norm, independent):
    rng = np.random.default_rng(2)
    images = jnp.asarray(rng.normal(size=(6, 16, 16, 3)), jnp.float32)
    other = images.at[3:].add(3.0)  # same first three samples, different batch companions
    model, variables = _tiny_variables(norm, images)
    first = _train_logits(model, variables, images)[:3]
    second = _train_logits(model, variables, other)[:3]
    if independent:
        np.testing.assert_allclose(first, second, rtol=1e-5, atol=1e-5)
    else:
        assert np.max(np.abs(first - second)) > 1e-3


def test_frozen_batchnorm_uses_running_statistics_in_training():
    rng = np.random.default_rng(3)
    images = jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32)
    model, variables = _tiny_variables("frozen", images)
    # Running statistics away from (0, 1): the frozen train-mode pass must use them, like inference.
    variables = {**variables, "batch_stats": jax.tree.map(lambda s: s + 0.5, variables["batch_stats"])}
    apply = jax.jit(model.apply, static_argnames="train")
    np.testing.assert_allclose(apply(variables, images, train=True),
                               apply(variables, images, train=False), rtol=1e-6, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params():
    rng = np.random.default_rng(4)
    images = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
    model32 = resnet.create_model("tiny", num_classes=3, norm="group")
    model16 = resnet.create_model("tiny", num_classes=3, norm="group", dtype=jnp.bfloat16)
    variables = model16.init(jax.random.key(0), images, train=False)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    logits16, intermediates = jax.jit(lambda v, x: model16.apply(
        v, x, capture_intermediates=True, mutable=["intermediates"]))(variables, images)
    assert intermediates["intermediates"]["conv1"]["__call__"][0].dtype == jnp.bfloat16
    assert logits16.dtype == jnp.float32
    np.testing.assert_allclose(logits16, jax.jit(model32.apply)(variables, images),
                               rtol=0.1, atol=0.1)


def test_bad_configuration_is_rejected():
    with pytest.raises(ValueError, match="resnet5"):
        resnet.create_model("resnet5", num_classes=2)
    with pytest.raises(ValueError, match="'batch'"):
        resnet.create_model("tiny", num_classes=2, norm="batch")
    with pytest.raises(ValueError, match="num_classes"):
        resnet.create_model("tiny", num_classes=0)
