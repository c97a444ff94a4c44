"""Tests of gerne_jax.models.pretrained: torchvision-layout state dicts into the Flax ResNets.

The reference is an independent numpy forward pass with torchvision's semantics (NCHW, torch
weight layout, symmetric padding k // 2, max pool padded with -inf, eps 1e-5) computed straight
from the random state dict, compared block by block with the Flax model in float64.

The comparison with torchvision itself runs when torch and torchvision are importable, or when
GERNE_TORCH_PYTHON names a Python interpreter that has them (e.g. a separate venv made with
`python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch torchvision safetensors numpy`).
"""

from __future__ import annotations

import functools
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from numpy.lib.stride_tricks import sliding_window_view
from safetensors.numpy import load_file, save_file

from gerne_jax.core.errors import InputError
from gerne_jax.models import pretrained, resnet
from tests.torchvision_weights import ARCHS, torchvision_state_dict

EPS = 1e-5
# ---------------------------------------------------------------------------------------------
# numpy forward pass with torchvision's semantics, NCHW, float64.

def np_conv(x, weight, stride=1):
    k = weight.shape[-1]
    x = np.pad(x, ((0, 0), (0, 0), (k // 2, k // 2), (k // 2, k // 2)))
    windows = sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    return np.einsum("nchwij,ocij->nohw", windows, weight.astype(np.float64), optimize=True)


def np_bn(x, state, name):
    def channel(v):
        return state[f"{name}.{v}"].astype(np.float64)[None, :, None, None]
    return (x - channel("running_mean")) / np.sqrt(channel("running_var") + EPS) * channel("weight") \
        + channel("bias")


def np_max_pool(x):
    x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    return sliding_window_view(x, (3, 3), axis=(2, 3))[:, :, ::2, ::2].max(axis=(-2, -1))


def np_resnet(state, arch, images_nhwc, fc_kernel, fc_bias):
    """Returns ({flax block name: NHWC output}, logits)."""
    stage_sizes, bottleneck, _ = ARCHS[arch]
    relu = lambda v: np.maximum(v, 0)
    x = images_nhwc.astype(np.float64).transpose(0, 3, 1, 2)
    x = np_max_pool(relu(np_bn(np_conv(x, state["conv1.weight"], 2), state, "bn1")))
    outputs = {}
    for stage, num_blocks in enumerate(stage_sizes):
        for block in range(num_blocks):
            p = f"layer{stage + 1}.{block}"
            stride = 2 if stage > 0 and block == 0 else 1
            if bottleneck:
                y = relu(np_bn(np_conv(x, state[f"{p}.conv1.weight"]), state, f"{p}.bn1"))
                y = relu(np_bn(np_conv(y, state[f"{p}.conv2.weight"], stride), state, f"{p}.bn2"))
                y = np_bn(np_conv(y, state[f"{p}.conv3.weight"]), state, f"{p}.bn3")
            else:
                y = relu(np_bn(np_conv(x, state[f"{p}.conv1.weight"], stride), state, f"{p}.bn1"))
                y = np_bn(np_conv(y, state[f"{p}.conv2.weight"]), state, f"{p}.bn2")
            shortcut = x
            if f"{p}.downsample.0.weight" in state:
                shortcut = np_bn(np_conv(x, state[f"{p}.downsample.0.weight"], stride), state,
                                 f"{p}.downsample.1")
            x = relu(y + shortcut)
            outputs[f"layer{stage + 1}_{block}"] = x.transpose(0, 2, 3, 1)
    features = x.mean(axis=(2, 3))
    return outputs, features @ np.asarray(fc_kernel, np.float64) + np.asarray(fc_bias, np.float64)


# ---------------------------------------------------------------------------------------------
# Helpers.

def init_variables(model, size, channels, seed=1):
    """Stand-in for `model.init(...)` (what experiment.py passes): its exact tree and shapes, from
    `jax.eval_shape`, filled with random values, without compiling the initialisers."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, channels)),
                                               train=False))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype), shapes)


def save(tmp_path, state, name="weights.safetensors"):
    path = tmp_path / name
    save_file(state, str(path))
    return path


def apply(model, variables, images):
    return np.asarray(_apply(model, variables, images))


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, variables, images):
    return model.apply(variables, images, train=False)


# ---------------------------------------------------------------------------------------------
# Conversion reproduces the numpy forward pass.

@pytest.mark.parametrize("arch,size", [
    ("resnet18", 33), ("resnet50", 33),
    ("resnet18", 32),
])
def test_forward_matches_numpy_block_by_block(tmp_path, arch, size):
    state = torchvision_state_dict(arch)
    path = save(tmp_path, state)
    images = np.random.default_rng(2).normal(size=(2, size, size, 3)).astype(np.float32)
    with jax.enable_x64(True):
        model = resnet.create_model(arch, num_classes=2, norm="frozen", dtype=jnp.float64)
        variables = pretrained.load_pretrained(path, model, init_variables(model, size, 3))
        variables64 = jax.tree.map(lambda v: v.astype(jnp.float64), variables)
        logits, captured = jax.jit(lambda v, x: model.apply(v, x, train=False,
                                                            capture_intermediates=True))(
            variables64, images.astype(np.float64))
    want_blocks, want_logits = np_resnet(state, arch, images, variables["params"]["fc"]["kernel"],
                                         variables["params"]["fc"]["bias"])
    for name, want in want_blocks.items():
        got = np.asarray(captured["intermediates"][name]["__call__"][0])
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max(),
                                   err_msg=f"{arch} block {name}")
    # Logits are returned in float32.
    np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=1e-6,
                               atol=1e-6 * np.abs(want_logits).max())


def test_every_variable_comes_from_the_checkpoint_except_the_head(tmp_path):
    state = torchvision_state_dict("tiny", num_classes=1000)
    model = resnet.create_model("tiny", num_classes=2, norm="frozen")
    template = init_variables(model, 16, 3)
    loaded = pretrained.load_pretrained(save(tmp_path, state), model, template)
    assert jax.tree.structure(loaded) == jax.tree.structure(template)
    # Hand-written torchvision names for a few variables, one per kind.
    p, s = loaded["params"], loaded["batch_stats"]
    np.testing.assert_array_equal(p["conv1"]["kernel"], state["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(p["layer2_0"]["downsample_conv"]["kernel"],
                                  state["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(p["layer2_0"]["downsample_bn"]["scale"],
                                  state["layer2.0.downsample.1.weight"])
    np.testing.assert_array_equal(p["layer1_0"]["bn2"]["bias"], state["layer1.0.bn2.bias"])
    np.testing.assert_array_equal(s["layer1_0"]["bn1"]["mean"], state["layer1.0.bn1.running_mean"])
    np.testing.assert_array_equal(s["bn1"]["var"], state["bn1.running_var"])
    # Every non-head variable differs from the fresh init (so it was loaded); the head is the init.
    flat_loaded = traverse_util.flatten_dict(loaded)
    flat_template = traverse_util.flatten_dict(template)
    for key, value in flat_loaded.items():
        if key[1] == "fc":
            np.testing.assert_array_equal(value, flat_template[key])
        else:
            assert not np.array_equal(value, flat_template[key]), key
        assert value.dtype == jnp.float32, key


def test_checkpoint_without_head_and_module_prefix_loads(tmp_path):
    state = torchvision_state_dict("tiny")
    reference_path = save(tmp_path, state, "plain.safetensors")
    wrapped = {f"module.{key}": value for key, value in state.items() if not key.startswith("fc.")}
    model = resnet.create_model("tiny", num_classes=3, norm="shared")
    template = init_variables(model, 16, 3)
    want = pretrained.load_pretrained(reference_path, model, template)
    got = pretrained.load_pretrained(save(tmp_path, wrapped, "wrapped.safetensors"), model, template)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_read_state_dict_drops_counters_and_makes_float32(tmp_path):
    state = torchvision_state_dict("tiny")
    state["conv1.weight"] = state["conv1.weight"].astype(np.float16)
    read = pretrained.read_state_dict(save(tmp_path, state))
    assert set(read) == {key for key in state if not key.endswith("num_batches_tracked")}
    assert all(value.dtype == np.float32 for value in read.values())


# ---------------------------------------------------------------------------------------------
# Input channels other than RGB.

@pytest.mark.parametrize("channels", [1, 5])
def test_default_stem_is_rescaled_rgb_mean(tmp_path, channels):
    state = torchvision_state_dict("tiny")
    path = save(tmp_path, state)
    model = resnet.create_model("tiny", num_classes=2, norm="frozen")
    loaded = pretrained.load_pretrained(path, model, init_variables(model, 16, channels))
    rgb = state["conv1.weight"].astype(np.float64)  # [O, 3, 7, 7]
    want = np.repeat(rgb.mean(axis=1, keepdims=True), channels, axis=1) * 3 / channels
    np.testing.assert_allclose(loaded["params"]["conv1"]["kernel"], want.transpose(2, 3, 1, 0),
                               rtol=1e-6, atol=1e-7)
    # A grey image repeated over the C channels gives the RGB model's logits on the grey RGB image.
    rgb_variables = pretrained.load_pretrained(path, model, init_variables(model, 16, 3))
    rgb_variables["params"]["fc"] = loaded["params"]["fc"]
    grey = np.random.default_rng(3).normal(size=(2, 16, 16, 1)).astype(np.float32)
    np.testing.assert_allclose(apply(model, loaded, np.repeat(grey, channels, axis=-1)),
                               apply(model, rgb_variables, np.repeat(grey, 3, axis=-1)),
                               rtol=1e-4, atol=1e-5)


def test_channel_mapping_selects_and_zeroes_filters(tmp_path):
    path = save(tmp_path, torchvision_state_dict("tiny"))
    model = resnet.create_model("tiny", num_classes=2, norm="frozen")
    rgb_variables = pretrained.load_pretrained(path, model, init_variables(model, 16, 3))
    images = np.random.default_rng(4).normal(size=(2, 16, 16, 4)).astype(np.float32)
    want = apply(model, rgb_variables, images[..., :3])

    # BGR order: the model on BGR images reproduces the RGB model on RGB images.
    bgr = pretrained.load_pretrained(path, model, init_variables(model, 16, 3), "blue,green,red")
    bgr["params"]["fc"] = rgb_variables["params"]["fc"]
    np.testing.assert_allclose(apply(model, bgr, images[..., 2::-1]), want, rtol=1e-5, atol=1e-6)

    # A fourth channel mapped to "zero" is ignored; three used channels keep the scale 3 / 3.
    four = pretrained.load_pretrained(path, model, init_variables(model, 16, 4),
                                      ["red", "green", "blue", "zero"])
    four["params"]["fc"] = rgb_variables["params"]["fc"]
    np.testing.assert_allclose(apply(model, four, images), want, rtol=1e-5, atol=1e-6)


def test_adapt_stem_kernel_scale_counts_used_channels():
    rgb = np.random.default_rng(5).normal(size=(4, 3, 7, 7))
    got = pretrained.adapt_stem_kernel(rgb, ("green", "mean", "zero", "green"))
    scale = 3 / 3
    np.testing.assert_allclose(got[:, 0], rgb[:, 1] * scale)
    np.testing.assert_allclose(got[:, 1], (rgb[:, 0] + rgb[:, 1] + rgb[:, 2]) / 3 * scale)
    np.testing.assert_array_equal(got[:, 2], 0)
    np.testing.assert_allclose(got[:, 3], rgb[:, 1] * scale)


@pytest.mark.parametrize("mapping,channels,message", [
    ("red,green", 3, "names 2 channels but the data has 3"),
    (["red", "purple", "blue"], 3, "unknown source(s) ['purple']"),
    ("zero,zero", 2, "every channel to 'zero'"),
])
def test_bad_channel_mapping_is_named(mapping, channels, message):
    with pytest.raises(ValueError) as error:
        pretrained.parse_channel_mapping(mapping, channels)
    assert message in str(error.value)


def test_multichannel_stem_loads_as_is_or_fails_clearly(tmp_path):
    state = torchvision_state_dict("tiny", in_channels=4)
    path = save(tmp_path, state)
    model = resnet.create_model("tiny", num_classes=2, norm="frozen")
    loaded = pretrained.load_pretrained(path, model, init_variables(model, 16, 4))
    np.testing.assert_array_equal(loaded["params"]["conv1"]["kernel"],
                                  state["conv1.weight"].transpose(2, 3, 1, 0))
    with pytest.raises(ValueError, match="stem has 4 input channels, the data 5"):
        pretrained.load_pretrained(path, model, init_variables(model, 16, 5))
    with pytest.raises(ValueError, match="channel mapping needs RGB stem filters"):
        pretrained.load_pretrained(path, model, init_variables(model, 16, 4), "red,green,blue,mean")


# ---------------------------------------------------------------------------------------------
# Mismatches are errors that list the offending keys.

def test_wrong_depth_names_both_architectures_and_keys(tmp_path):
    path = save(tmp_path, torchvision_state_dict("resnet50"), "resnet50.safetensors")
    model = resnet.create_model("resnet18", num_classes=2, norm="frozen")
    with pytest.raises(ValueError) as error:
        pretrained.load_pretrained(path, model, init_variables(model, 32, 3))
    message = str(error.value)
    assert "resnet50.safetensors" in message
    assert "ResNet-50 (bottleneck blocks per stage (3, 4, 6, 3))" in message
    assert "ResNet-18 (basic blocks per stage (2, 2, 2, 2))" in message
    assert "layer1.0.conv3.weight" in message  # unexpected
    assert "shape mismatch" in message and "layer1.0.conv1.weight (64, 64, 1, 1)" in message


def test_missing_extra_and_misshapen_keys_are_listed(tmp_path):
    state = torchvision_state_dict("tiny")
    del state["layer1.0.bn2.running_var"]
    state["layer1.0.se.fc1.weight"] = np.zeros((2, 8), np.float32)
    state["layer2.0.conv2.weight"] = np.zeros((16, 8, 3, 3), np.float32)
    model = resnet.create_model("tiny", num_classes=2, norm="frozen")
    with pytest.raises(ValueError) as error:
        pretrained.load_pretrained(save(tmp_path, state), model, init_variables(model, 16, 3))
    message = str(error.value)
    assert "missing from the checkpoint (1): layer1.0.bn2.running_var" in message
    assert "unexpected in the checkpoint (1): layer1.0.se.fc1.weight" in message
    assert "shape mismatch (1): layer2.0.conv2.weight (16, 8, 3, 3)" in message
    assert "model wants (3, 3, 16, 16)" in message
    assert "the checkpoint is a" not in message  # same architecture: no depth complaint


def test_group_norm_model_is_rejected(tmp_path):
    path = save(tmp_path, torchvision_state_dict("tiny"))
    model = resnet.create_model("tiny", num_classes=2, norm="group")
    with pytest.raises(ValueError, match="norm 'group'.*'frozen'"):
        pretrained.load_pretrained(path, model, init_variables(model, 16, 3))
    with pytest.raises(ValueError, match="no BatchNorm statistics"):
        pretrained.convert_state_dict(torchvision_state_dict("tiny"), init_variables(model, 16, 3))


def test_bad_files(tmp_path):
    model = resnet.create_model("tiny", num_classes=2, norm="frozen")
    template = init_variables(model, 16, 3)
    with pytest.raises(InputError, match="nowhere.safetensors.*model.init_from"):
        pretrained.load_pretrained(tmp_path / "nowhere.safetensors", model, template)
    (tmp_path / "weights.h5").write_bytes(b"x")
    with pytest.raises(ValueError, match="weights.h5.*unknown file type '.h5'"):
        pretrained.load_pretrained(tmp_path / "weights.h5", model, template)
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="broken.safetensors"):
        pretrained.load_pretrained(tmp_path / "broken.safetensors", model, template)


def test_resolve_norm():
    assert pretrained.resolve_norm("auto", "/weights/resnet50.safetensors") == "frozen"
    assert pretrained.resolve_norm("auto", "") == "group"
    assert pretrained.resolve_norm("shared", "/weights/resnet50.safetensors") == "shared"


# ---------------------------------------------------------------------------------------------
# torch checkpoints and torchvision itself (only where torch is available).

def _has_module(name):
    try:
        __import__(name)
        return True
    except ImportError:
        return False


@pytest.mark.skipif(_has_module("torch"), reason="torch is installed")
def test_pth_without_torch_says_what_to_do(tmp_path):
    (tmp_path / "weights.pth").write_bytes(b"x")
    model = resnet.create_model("tiny", num_classes=2, norm="frozen")
    with pytest.raises(ImportError, match="weights.pth.*needs torch.*safetensors"):
        pretrained.load_pretrained(tmp_path / "weights.pth", model, init_variables(model, 16, 3))


def test_nested_pth_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    state = torchvision_state_dict("tiny")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": torch.from_numpy(v) for k, v in state.items()}},
               tmp_path / "checkpoint.pth")
    model = resnet.create_model("tiny", num_classes=2, norm="frozen")
    template = init_variables(model, 16, 3)
    got = pretrained.load_pretrained(tmp_path / "checkpoint.pth", model, template)
    want = pretrained.load_pretrained(save(tmp_path, state), model, template)
    jax.tree.map(np.testing.assert_array_equal, got, want)


# Run by the torch-side interpreter: a random torchvision ResNet with BatchNorm statistics
# calibrated on random images (so activations have the unit scale of trained weights), its
# weights as safetensors, an input batch and the logits in float32 and float64.
TORCH_SIDE = textwrap.dedent("""
    import sys, numpy as np, torch, torchvision
    from safetensors.torch import save_file
    out, arch, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None)
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.reset_running_stats()
        module.momentum = None
    model.train()
    with torch.no_grad():
      model(torch.randn(16, 3, size, size))
    model.eval()
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
      logits = model(images)
      logits64 = model.double()(images.double())
    save_file({k: v.float().contiguous() for k, v in model.state_dict().items()},
              f"{out}/{arch}.safetensors")
    np.save(f"{out}/images.npy", images.permute(0, 2, 3, 1).numpy())
    np.save(f"{out}/logits.npy", logits.numpy())
    np.save(f"{out}/logits64.npy", logits64.numpy())
""")


def run_torchvision(out: pathlib.Path, arch: str, size: int) -> None:
    python = os.environ.get("GERNE_TORCH_PYTHON")
    if not python:
        pytest.importorskip("torch")
        pytest.importorskip("torchvision")
        python = sys.executable
    subprocess.run([python, "-c", TORCH_SIDE, str(out), arch, str(size)], check=True)


@pytest.mark.parametrize("size", [65, 64])
def test_resnet50_matches_torchvision(tmp_path, size):
    run_torchvision(tmp_path, "resnet50", size)
    images = np.load(tmp_path / "images.npy")
    state = load_file(str(tmp_path / "resnet50.safetensors"))
    head = {"kernel": jnp.asarray(state["fc.weight"].T), "bias": jnp.asarray(state["fc.bias"])}

    model = resnet.create_model("resnet50", num_classes=1000, norm="frozen")
    variables = pretrained.load_pretrained(tmp_path / "resnet50.safetensors", model,
                                           init_variables(model, size, 3))
    variables["params"]["fc"] = head
    logits = apply(model, variables, images)
    want = np.load(tmp_path / "logits.npy")
    print(f"\nresnet50 {size}x{size}: max |flax - torchvision| float32 = "
          f"{np.abs(logits - want).max():.2e} (logits up to {np.abs(want).max():.2f})")
    # float32 accumulation order differs between XLA and torch: relative 1e-4 of the logit scale.
    np.testing.assert_allclose(logits, want, atol=1e-4 * max(1.0, np.abs(want).max()), rtol=0)

    # In float64 both are exact up to the float32 rounding of the returned logits.
    with jax.enable_x64(True):
        model64 = resnet.create_model("resnet50", num_classes=1000, norm="frozen", dtype=jnp.float64)
        variables64 = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), variables)
        logits64 = apply(model64, variables64, images.astype(np.float64))
    want64 = np.load(tmp_path / "logits64.npy")
    print(f"resnet50 {size}x{size}: max |flax - torchvision| float64 = "
          f"{np.abs(logits64 - want64).max():.2e}")
    np.testing.assert_allclose(logits64, want64, rtol=1e-6, atol=1e-6 * np.abs(want64).max())
