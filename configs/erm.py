"""ERM: the biased batch alone (class-balanced, natural group shares within each class).

Equivalent to GERNE with beta = -1, without computing the unused less-biased gradient.
"""
from configs import default


def get_config(arg: str | None = None):
    return default.build({"method.name": "erm", "method.beta": -1.0}, arg)
