"""The core modules import no TensorFlow, so they run where it is absent (docs/design.md §7): the model,
the pretrained-weight loader, the extrapolation transformation, the training methods, the train state
and step, the sharding helpers, the metrics and the dataset and group definitions. Only the input pipeline and the shard
writer use TensorFlow."""
import subprocess
import sys

import pytest

TENSORFLOW_FREE = ["gerne_jax.models.resnet", "gerne_jax.models.pretrained", "gerne_jax.train.extrapolation",
                   "gerne_jax.methods.registry", "gerne_jax.train.method", "gerne_jax.train.train_state",
                   "gerne_jax.train.train_step",
                   "gerne_jax.core.sharding", "gerne_jax.evaluation.metrics", "gerne_jax.data.dataset",
                   "gerne_jax.data.groups", "gerne_jax.data.samplers"]


@pytest.mark.parametrize("module", TENSORFLOW_FREE)
def test_module_imports_no_tensorflow(module):
    code = (f"import sys, {module}; "
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tf_keras')); "
            "assert not loaded, loaded")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-2000:]
