"""A pixel-wise tumour segmentation network on the classifiers' backbone (the segmentation study,
experiments/segmentation.py).

`SegmentationNet` runs a `resnet.ResNet` of `resnet.MODELS` (same blocks, names and normalisation as the
patch classifiers, `features_only=True`) and a light feature-pyramid head: each feature map (the stem's at
1/2 of the input, then every stage's, down to 1/8 for `tiny`) goes through a 1x1 convolution to
`head_features` channels and is resized bilinearly back to the input's P x P; the maps are summed, passed
through a ReLU and a last 1x1 convolution to the class logits `[N, P, P, K]` (float32). The shallow stem
feature keeps boundaries sharp, the deeper stages bring context; no decoder convolutions beyond 1x1, so
the head adds few parameters to the backbone's.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gerne_jax.models import resnet


class SegmentationNet(nn.Module):
    """Per-pixel class logits of `[N, P, P, C]` images; call as `model.apply(variables, images, train=...)`.

    Attributes:
      backbone: the ResNet that gives the feature maps (built with `features_only=True`).
      num_classes: logits per pixel.
      head_features: channels of the summed pyramid.
      dtype: compute dtype of the head (parameters are float32).
    """

    backbone: resnet.ResNet
    num_classes: int = 2
    head_features: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        if not self.backbone.features_only:
            raise ValueError("the backbone of a SegmentationNet must be built with features_only=True")
        n, height, width, _ = images.shape
        summed = jnp.zeros((n, height, width, self.head_features), self.dtype)
        for level, feature in enumerate(self.backbone(images, train=train)):
            lateral = nn.Conv(self.head_features, (1, 1), dtype=self.dtype, param_dtype=jnp.float32,
                              name=f"lateral{level}")(feature)
            summed = summed + jax.image.resize(lateral, summed.shape, method="bilinear")
        logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, param_dtype=jnp.float32,
                         name="classifier")(nn.relu(summed))
        return logits.astype(jnp.float32)


def create_segmentation_model(name: str = "tiny", *, num_classes: int = 2, norm: str = "group",
                              head_features: int = 32, dtype: Any = jnp.float32) -> SegmentationNet:
    """A `SegmentationNet` on the backbone `resnet.create_model(name, norm=norm)` of the classifiers."""
    if norm in resnet.TRAIN_MODE_BATCH_NORM:
        raise ValueError(f"norm {norm!r} keeps running statistics, which the segmentation study does not "
                         "train; use 'group' (or 'frozen')")
    backbone = resnet.create_model(name, num_classes=num_classes, norm=norm, dtype=dtype)
    return SegmentationNet(backbone=backbone.clone(features_only=True), num_classes=num_classes,
                           head_features=head_features, dtype=jnp.dtype(dtype))
