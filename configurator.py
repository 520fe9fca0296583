"""
Command-line configuration shared by train.py, sample.py, eval.py and bench.py (nanoGPT style).

Each script declares its settings as a dict of defaults; the command line may name config files
(plain Python files whose top-level assignments override defaults) and `--key=value` or
`--key value` overrides. Values are parsed as Python literals and must match the default's type.
Any mistake (unknown key, wrong type, missing file) is a one-line error and exit code 2.

    python train.py config/quick.py --max_iters=100 --device cpu
"""

import ast
import sys


class UsageError(Exception):
    """A mistake in what the user asked for; scripts print it on one line and exit 2."""


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _parse(key, text, default):
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare word is a string: --solver midpoint
    if isinstance(default, str) and not isinstance(value, str):
        return text  # a string option takes other literals as typed: --start 12 is the prompt "12"
    if default is None or value is None:
        return value
    if isinstance(default, bool) and not isinstance(value, bool):
        raise UsageError(f"--{key} must be True or False, got {text!r}")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, type(default)):
        raise UsageError(f"--{key} must be a {type(default).__name__}, got {text!r}")
    return value


def _run_config_file(path, config):
    try:
        with open(path) as f:
            source = f.read()
    except OSError:
        raise UsageError(f"config file {path} not found") from None
    values = {}
    exec(compile(source, path, "exec"), {}, values)
    for key, value in values.items():
        if key.startswith("_") or callable(value) or type(value).__name__ == "module":
            continue
        if key not in config:
            raise UsageError(f"{path} sets unknown key {key!r}")
        config[key] = value


def configure(defaults, argv=None):
    """Return a copy of `defaults` updated by the config files and overrides in argv."""
    config = dict(defaults)
    args = list(sys.argv[1:] if argv is None else argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            _run_config_file(arg, config)
            continue
        key, eq, text = arg[2:].partition("=")
        if key not in config:
            raise UsageError(f"unknown option --{key} (known: {', '.join('--' + k for k in config)})")
        if not eq:
            if isinstance(config[key], bool) and (not args or args[0].startswith("--")):
                text = "True"  # a bare flag: --chat
            elif not args:
                raise UsageError(f"--{key} needs a value")
            else:
                text = args.pop(0)
        config[key] = _parse(key, text, defaults[key])
    return config
