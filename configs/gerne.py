"""GERNE with the official defaults (beta = 1, c = 0.5, corr = 0.5) on a from-scratch ResNet-50."""
from configs import default


def get_config(arg: str | None = None):
    return default.build({"method.name": "gerne", "method.beta": 1.0, "method.c": 0.5}, arg)
