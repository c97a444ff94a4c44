"""What the command lines share: logging set-up, the one-line answer to bad input, the exit after SIGTERM,
and the dispatch of `PROG COMMAND ...` to one command's `main(argv)`."""
from __future__ import annotations

import logging
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from absl import flags
from absl import logging as absl_logging

from gerne_jax.core import config_utils
from gerne_jax.core.errors import ConfigError, InputError, Interrupted, cause_chain

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM


def setup_logging(main_process: bool = True) -> None:
    """Our messages at INFO; the libraries' (orbax, TFDS, absl) chatter only from WARNING or ERROR up.

    The other processes of a multi-process run (`main_process=False`) log errors only: process 0
    logs what they would repeat.
    """
    logging.basicConfig(level=logging.WARNING if main_process else logging.ERROR,
                        format="%(asctime)s %(message)s", force=True)
    logging.getLogger("train").setLevel(logging.INFO if main_process else logging.ERROR)
    logging.getLogger("asyncio").addFilter(_drop_orbax_unretrieved)
    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax warns about read-only checkpoint managers


def _drop_orbax_unretrieved(record: logging.LogRecord) -> bool:
    """False for asyncio's "exception was never retrieved" about an orbax read task.

    A failed restore leaves orbax's other read tasks failing unobserved; asyncio logs each with a traceback
    when it is collected. `checkpoints` has already reported the restore in one line (and fallen back).
    """
    if "exception was never retrieved" not in record.getMessage() or not record.exc_info:
        return True
    frames = traceback.extract_tb(record.exc_info[2])
    return not any(f"{os.sep}orbax{os.sep}" in frame.filename for frame in frames)


def exit_after_interruption() -> NoReturn:
    """Exits with 143 once a SIGTERM-interrupted run has saved and closed everything.

    Skips interpreter teardown: the tf.data iterator's destructor can wait for a worker thread that
    waits for the GIL, which hung runs after SIGTERM. Call it from a command's `main` only.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(SIGTERM_EXIT_CODE)


def run_command(main: Callable[[], int | None]) -> NoReturn:
    """Runs a command's `main` and exits with its status; an `InputError` becomes one line and status 2.

    `error: <message>` on stderr, no traceback: the message names the file, slide, checkpoint or config key.
    An `Interrupted` job (SIGTERM, state saved) exits with 143 through `exit_after_interruption`.
    Any other exception keeps its traceback (a bug). Noise that libraries print while the interpreter
    shuts down (asyncio's "Event loop is closed" from orbax's background loops) is dropped.
    """
    # TensorFlow's C++ start-up chatter (INFO and WARNING), unless asked for: the commands import it after this.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.unraisablehook = _quiet_unraisable_hook(sys.unraisablehook)
    try:
        code = main()
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        code = 2
    except Interrupted as stop:
        print(f"{stop}; run the same command again to resume", file=sys.stderr)
        exit_after_interruption()
    sys.exit(code or 0)


def _quiet_unraisable_hook(default_hook: Callable[[Any], None]) -> Callable[[Any], None]:
    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
            return
        default_hook(unraisable)

    return hook


Command = Callable[[list[str]], int | None]  # a command's `main(argv)`, its docstring its help summary
LoadCommand = Callable[[], Command]  # imports the command's module only when called


def dispatch(prog: str, commands: Mapping[str, LoadCommand], argv: list[str]) -> int | None:
    """Runs `PROG COMMAND ARGS...`: `commands[COMMAND]()` is loaded, then called with ARGS.

    Each command parses its own arguments (argparse or absl), so `PROG COMMAND --help` is the command's
    own help. A command is loaded only to be run or, for `PROG --help`, for the first line of its docstring.
    """
    if not argv or argv[0] in ("-h", "--help"):
        lines = [f"usage: {prog} COMMAND [ARGS...]  ({prog} COMMAND --help for a command's options)", "",
                 "commands:"]
        width = max(map(len, commands), default=0)
        for name, load in commands.items():
            summary = (load().__doc__ or "").strip().splitlines()
            lines.append(f"  {name:<{width}}  {summary[0] if summary else ''}")
        print("\n".join(lines))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in commands:
        raise InputError(f"unknown command {name!r}{config_utils.did_you_mean(name, list(commands))}; "
                         f"choose one of {', '.join(commands)} ({prog} --help)")
    return commands[name]()(rest)


def parse_config_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """absl's flag parsing for a command with an ml_collections `--config` file flag (train.py), with a bad
    flag, config switch or config key raised as a one-line InputError.

    Use as `app.run(main, flags_parser=parse_config_flags)`. absl would print a "FATAL Flags parsing
    error" with a traceback of the config file (for a bad switch) or let ml_collections' KeyError escape
    with a traceback (for an unknown `--config.<key>`).
    """
    spec = config_spec(argv)
    if spec is not None and not os.path.isfile(spec.split(":", 1)[0]):
        # ml_collections would defer this to the first use of the config, with a traceback.
        raise InputError(f"config file {spec.split(':', 1)[0]} does not exist (--config={spec})")
    try:
        return flag_values(argv)
    except Exception as error:  # ml_collections raises KeyError/AttributeError for unknown keys
        raise _flag_error(argv, error, flag_values) from None


def _flag_error(argv: list[str], error: Exception, flag_values: flags.FlagValues) -> Exception:
    """The InputError that says what was wrong with the command line, or `error` itself when it is a bug."""
    # The innermost InputError: e.g. an unknown switch raised by the config file's get_config, which
    # ml_collections re-raises as the same type with the config file's traceback in the message.
    for cause in reversed(cause_chain(error)):
        if isinstance(cause, InputError):
            return cause
    unknown = _unknown_config_key(argv, flag_values)
    if unknown is not None:
        return unknown
    if isinstance(error, flags.Error):
        return InputError(str(error).splitlines()[0])
    return error


def _unknown_config_key(argv: list[str], flag_values: flags.FlagValues) -> ConfigError | None:
    """A ConfigError for the first `--config.<key>=...` whose key the config does not have, naming the closest."""
    spec = config_spec(argv)
    if spec is None:
        return None
    try:
        config = flag_values["config"].parser.parse(spec)
    except Exception:  # the config file itself is at fault; absl's error says how
        return None
    flat = config_utils.flatten(config)
    valid = sorted(flat.keys() | {prefix for key in flat for prefix in _prefixes(key)})
    for arg in argv:
        match = re.match(r"^--?(?:no)?config\.([^=]+)", arg)
        if match and match.group(1) not in valid:
            key = match.group(1)
            return ConfigError(f"unknown config key {key!r} in {arg}{config_utils.did_you_mean(key, valid)}")
    return None


def config_spec(argv: list[str]) -> str | None:
    """The value of `--config=PATH[:ARG]` or `--config PATH[:ARG]`."""
    for i, arg in enumerate(argv):
        match = re.match(r"^--?config(=|$)", arg)
        if match and match.group(1):
            return arg.split("=", 1)[1]
        if match and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _prefixes(key: str) -> list[str]:
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def comma_names(text: str) -> tuple[str, ...]:
    """An argparse type: a comma-separated list of names (channels, QuPath classes)."""
    return tuple(name.strip() for name in text.split(","))
