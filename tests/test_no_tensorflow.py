"""The model, extrapolation and train-step modules run where TensorFlow is absent (SPEC 5)."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["gerne_jax.models", "gerne_jax.extrapolation",
                                    "gerne_jax.train_step"])
def test_module_imports_no_tensorflow(module):
    code = (f"import sys, {module}; "
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tf_keras')); "
            "assert not loaded, loaded")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-2000:]
