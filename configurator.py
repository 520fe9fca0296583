"""
The command line of every script (nanoGPT style). A script declares OPTIONS = dict(key=(default, "meaning"[,
allowed values])); config files (Python, `key = value` lines) and --key=value or --key value overrides apply in
order, each a Python literal of the default's type (a bare word: a string; a bare --flag: True; a None default
takes any type). -h prints the table. A mistake is one line and exit code 2.
"""

import ast
import math
import os
import sys
import textwrap
import traceback


class UsageError(Exception):
    """A mistake in what the user asked for; scripts print it on one line and exit 2."""


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def defaults(options):
    return {key: option[0] for key, option in options.items()}


# An option's optional third element: the values it may take, a tuple of choices or one of these rules.
RULES = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, ">= 1": lambda v: v >= 1,
         "in [0, 1]": lambda v: 0 <= v <= 1}


def typed(what, value, default):
    """`value` checked against `default`'s type (an int widens to a float; floats must be finite)."""
    if default is None or value is None:
        return value
    value = float(value) if isinstance(default, float) and type(value) is int else value
    if type(value) is not type(default):
        kind = "True or False" if isinstance(default, bool) else f"of type {type(default).__name__}"
        raise UsageError(f"{what} must be {kind}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{what} must be a finite number, got {value!r}")
    return value


def parse_list(key, value, kind, default):
    """--key as a list of `kind` from one value, a tuple/list or "1,2,4"; None: a copy of `default`."""
    if value is None:
        return list(default)
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise UsageError(f"--{key} is empty")
    if kind is str:
        names = [str(item).strip() for item in items]
        if not all(names):  # "" or "a,,b": not a name to look up later
            raise UsageError(f"--{key} {value!r} has an empty name: give one or several, comma-separated")
        return names
    numbers = []
    for item in items:
        try:
            number = float(item)
        except (TypeError, ValueError):
            raise UsageError(f"--{key} must be a number or a comma-separated list of numbers, got {value!r}") from None
        if isinstance(item, bool) or not (number.is_integer() if kind is int else math.isfinite(number)):
            raise UsageError(f"--{key} takes {'whole' if kind is int else 'finite'} numbers, got {item!r}")
        numbers.append(kind(number))
    return numbers


def config_file(path, config, options):
    """Apply a config file's `key = value` lines to config."""
    try:
        with open(path, encoding="utf-8") as f:
            code = compile(f.read(), path, "exec")
    except (OSError, ValueError, SyntaxError) as e:
        why = {FileNotFoundError: " not found", IsADirectoryError: " is a folder; pass a Python file such as config/quick.py",
               SyntaxError: f", line {getattr(e, 'lineno', '?')}: {getattr(e, 'msg', '')} (it must be Python: key = value)"}
        raise UsageError(f"config file {path}" + why.get(type(e), f" cannot be read: {e}")) from None
    values = {}
    try:
        exec(code, {}, values)
    except Exception as e:  # name the file's line, not a traceback into this module
        line = [frame.lineno for frame in traceback.extract_tb(e.__traceback__) if frame.filename == path] or ["?"]
        raise UsageError(f"config file {path}, line {line[-1]}: {type(e).__name__}: {' '.join(str(e).split())}") from None
    for key, value in values.items():
        if not (key.startswith("_") or callable(value) or type(value).__name__ == "module"):
            if key not in config:
                raise UsageError(f"{path} sets unknown key {key!r}")
            config[key] = typed(f"{key} in {path}", value, options[key][0])


def help_text(options, caller):
    """The docstring's first paragraph and the example commands after it, then the table of options."""
    spec, doc = caller.get("__spec__"), (caller.get("__doc__") or "").strip().split("\n\n")
    script = f"-m {spec.name}" if spec and "." in spec.name else caller["__file__"].rsplit("/", 1)[-1]
    usage = "\n\n".join(doc[:1] + [p for p in doc[1:3] if p.startswith("    ")])
    shown = {key: option[:2] for key, option in options.items() if not key.startswith("_")}  # "_": internal
    width = max(map(len, shown)) + 2
    indent = " " * (width + 22)
    lines = [f"usage: python {script} [CONFIG_FILE.py ...] [--key=value | --key value ...]", "", usage, "",
             "options (default, meaning):"]
    for key, (default, meaning) in shown.items():
        lead = f"  {'--' + key:<{width}}  {default!r:<16}  "
        if len(lead) > len(indent):  # a long default: its meaning on the lines below
            lines.append(lead.rstrip())
            lead = indent
        lines += textwrap.wrap(meaning, 100, initial_indent=lead, subsequent_indent=indent, break_on_hyphens=False)
    return "\n".join(lines)


def configure(options, argv=None):
    """OPTIONS' defaults updated by argv (default sys.argv[1:]); -h anywhere prints the help and exits."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        try:
            print(help_text(options, sys._getframe(1).f_globals), flush=True)
        except BrokenPipeError:  # -h | head: the reader has what it wanted (and exit must not flush again)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    config = defaults(options)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            config_file(arg, config, options)
            continue
        key, eq, text = arg[2:].partition("=")
        if key not in config:
            raise UsageError(f"unknown option --{key} (-h lists the options)")
        if not eq and isinstance(config[key], bool) and (not args or args[0].startswith("--")):
            text = "True"  # a bare flag: --chat
        elif not eq:
            if not args:
                raise UsageError(f"--{key} needs a value")
            text = args.pop(0)
        default = options[key][0]
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            value = text  # a bare word is a string: --solver midpoint
        if isinstance(default, float) and text.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
            value = float(text)  # refused by typed() as not finite, not as a string
        config[key] = text if isinstance(default, str) and not isinstance(value, str) else typed(f"--{key}", value, default)
    for key, (_, _, *allowed) in options.items():
        value, rule = config[key], allowed and allowed[0]
        if rule and value is not None and not (value in rule if isinstance(rule, tuple) else RULES[rule](value)):
            rule = f"one of {', '.join(rule)}" if isinstance(rule, tuple) else rule
            raise UsageError(f"--{key} must be {rule}, got {value!r}")
    return config
