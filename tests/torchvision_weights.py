"""A random torchvision-format ResNet state dict, built from torchvision's architecture independently of
the pretrained loader's own key generation (tests/models/test_pretrained.py, and a training test that
starts from it)."""
from __future__ import annotations

import numpy as np

# ResNet depth -> (blocks per stage, bottleneck), as in torchvision.
ARCHS = {"tiny": ((1, 1), False, 8), "resnet18": ((2, 2, 2, 2), False, 64),
         "resnet50": ((3, 4, 6, 3), True, 64)}


def torchvision_state_dict(arch: str, *, in_channels: int = 3, num_classes: int = 1000,
                           seed: int = 0) -> dict[str, np.ndarray]:
    stage_sizes, bottleneck, width = ARCHS[arch]
    rng = np.random.default_rng(seed)
    state = {}

    def conv(name, out_channels, in_channels, k):
        std = np.sqrt(2.0 / (in_channels * k * k))
        state[f"{name}.weight"] = rng.normal(0, std, (out_channels, in_channels, k, k)).astype(np.float32)

    def bn(name, channels, gain=1.0):
        state[f"{name}.weight"] = (rng.uniform(0.5, 1.5, channels) * gain).astype(np.float32)
        state[f"{name}.bias"] = rng.normal(0, 0.1, channels).astype(np.float32)
        state[f"{name}.running_mean"] = rng.normal(0, 0.1, channels).astype(np.float32)
        state[f"{name}.running_var"] = rng.uniform(0.5, 1.5, channels).astype(np.float32)
        state[f"{name}.num_batches_tracked"] = np.array(1000, np.int64)

    conv("conv1", width, in_channels, 7)
    bn("bn1", width)
    in_planes = width
    for stage, num_blocks in enumerate(stage_sizes):
        planes = width * 2**stage
        out_planes = planes * (4 if bottleneck else 1)
        for block in range(num_blocks):
            prefix = f"layer{stage + 1}.{block}"
            if bottleneck:
                conv(f"{prefix}.conv1", planes, in_planes, 1)
                bn(f"{prefix}.bn1", planes)
                conv(f"{prefix}.conv2", planes, planes, 3)
                bn(f"{prefix}.bn2", planes)
                conv(f"{prefix}.conv3", out_planes, planes, 1)
                bn(f"{prefix}.bn3", out_planes, gain=0.3)
            else:
                conv(f"{prefix}.conv1", planes, in_planes, 3)
                bn(f"{prefix}.bn1", planes)
                conv(f"{prefix}.conv2", planes, planes, 3)
                bn(f"{prefix}.bn2", planes, gain=0.3)
            if block == 0 and (stage > 0 or in_planes != out_planes):
                conv(f"{prefix}.downsample.0", out_planes, in_planes, 1)
                bn(f"{prefix}.downsample.1", out_planes)
            in_planes = out_planes
    state["fc.weight"] = rng.normal(0, 0.01, (num_classes, in_planes)).astype(np.float32)
    state["fc.bias"] = np.zeros(num_classes, np.float32)
    return state
