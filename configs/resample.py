"""Group-balanced resampling: GERNE's special case c = 1, beta = 0 (the less-biased batch decides)."""
from configs import default


def get_config(arg: str | None = None):
    return default.build({"method.name": "gerne", "method.c": 1.0, "method.beta": 0.0}, arg)
