"""
The command line of every script (nanoGPT style). A script declares OPTIONS = dict(key=(default,
"meaning")); the command line names config files (Python files of `key = value` lines) and --key=value
or --key value overrides, applied in order, each a Python literal of the default's type (a bare word is
a string, a bare --flag True; a None default takes any type). -h prints the table. A mistake is one
line and exit code 2:  python train.py config/quick.py --max_iters=100
"""

import ast
import math
import sys
import textwrap


class UsageError(Exception):
    """A mistake in what the user asked for; scripts print it on one line and exit 2."""


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def defaults(options):
    return {key: default for key, (default, _) in options.items()}


def typed(what, value, default):
    """`value` checked against `default`'s type (an int widens to a float; floats must be finite)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool) and not isinstance(value, bool):
        raise UsageError(f"{what} must be True or False, got {value!r}")
    value = float(value) if isinstance(default, float) and type(value) is int else value
    if not isinstance(value, type(default)) or isinstance(value, bool) != isinstance(default, bool):
        raise UsageError(f"{what} must be of type {type(default).__name__}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{what} must be a finite number, got {value!r}")
    return value


def parse_list(key, value, kind, default):
    """--key as a list of `kind` from one value, a tuple/list or "1,2,4"; None: a copy of `default`."""
    if value is None:
        return list(default)
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    if kind is str:
        items = [str(item).strip() for item in items]
    for i, item in enumerate(items if kind is not str else []):
        try:
            number = float(item)
        except (TypeError, ValueError):
            raise UsageError(f"--{key} must be a number or a comma-separated list of numbers, got {value!r}") from None
        if isinstance(item, bool) or (kind is int and not number.is_integer()):
            raise UsageError(f"--{key} takes {'whole ' if kind is int else ''}numbers, got {item!r}")
        if not math.isfinite(number):
            raise UsageError(f"--{key} takes finite numbers, got {item!r}")
        items[i] = kind(number)
    if not items:
        raise UsageError(f"--{key} is empty")
    return items


def config_file(path, config, options):
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
        tb, line = e.__traceback__, "?"
        while tb:
            line = tb.tb_lineno if tb.tb_frame.f_code.co_filename == path else line
            tb = tb.tb_next
        raise UsageError(f"config file {path}, line {line}: {type(e).__name__}: {' '.join(str(e).split())}") from None
    for key, value in values.items():
        if not (key.startswith("_") or callable(value) or type(value).__name__ == "module"):
            if key not in config:
                raise UsageError(f"{path} sets unknown key {key!r}")
            config[key] = typed(f"{key} in {path}", value, options[key][0])


def help_text(options, caller):
    spec, doc = caller.get("__spec__"), (caller.get("__doc__") or "").strip()
    script = f"-m {spec.name}" if spec and "." in spec.name else caller["__file__"].rsplit("/", 1)[-1]
    usage = doc.split("\n\n")[0] + "".join("\n\n" + p for p in doc.split("\n\n")[1:3] if p.startswith("    "))
    shown = {k: v for k, v in options.items() if not k.startswith("_")}
    width, value_width = max(map(len, shown)) + 2, min(16, max(len(repr(d)) for d, _ in shown.values()))
    lines = [f"usage: python {script} [CONFIG_FILE.py ...] [--key=value | --key value ...]", "", usage, "",
             "options (default, meaning):"]
    indent = " " * (width + value_width + 6)
    for key, (default, meaning) in shown.items():
        lead = f"  {'--' + key:<{width}}  {default!r:<{value_width}}  "
        text = textwrap.wrap(meaning, 100 - len(indent), break_on_hyphens=False) or [""]
        lines += [lead + text[0]] if len(lead) <= len(indent) else [lead.rstrip(), indent + text[0]]
        lines += [indent + line for line in text[1:]]
    return "\n".join(lines)


def configure(options, argv=None):
    """OPTIONS' defaults updated by argv (default sys.argv[1:]); -h anywhere prints the help and exits."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(help_text(options, sys._getframe(1).f_globals), flush=True)
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
        if not eq:
            if isinstance(config[key], bool) and (not args or args[0].startswith("--")):
                text = "True"  # a bare flag: --chat
            elif not args:
                raise UsageError(f"--{key} needs a value")
            else:
                text = args.pop(0)
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            value = text  # a bare word is a string: --solver midpoint
        default = options[key][0]
        if isinstance(default, float) and text.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
            value = float(text)  # refused by typed() as not finite, not as a string
        config[key] = text if isinstance(default, str) and not isinstance(value, str) else typed(f"--{key}", value, default)
    return config
