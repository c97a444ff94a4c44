"""`python -m gerne_jax COMMAND ...`: the `gerne-jax` console tool."""
from gerne_jax import console

if __name__ == "__main__":
    console.main()
