"""
Command-line configuration shared by train.py, sample.py, eval.py and bench.py (nanoGPT style).

Each script declares its settings as a dict of defaults; the command line may name config files
(plain Python files whose top-level assignments override defaults) and `--key=value` or
`--key value` overrides. Values are parsed as Python literals and must match the default's type,
in a config file as on the command line. Any mistake (unknown key, wrong type, a config file that
is missing or fails) is a one-line error and exit code 2.

    python train.py config/quick.py --max_iters=100 --device cpu
    python train.py --help

-h / --help prints the script's usage and its options, read from the script's own source so that
the comments in its `DEFAULTS = dict(...)` are the only place an option is explained: the comment
at the end of a line is the meaning of the keys on that line; whole-line comments are headings of
the keys below them. Keys starting with "_" are internal and not listed.
"""

import ast
import io
import os
import sys
import textwrap
import tokenize

HELP_WIDTH = 100


class UsageError(Exception):
    """A mistake in what the user asked for; scripts print it on one line and exit 2."""


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def resolve_device(name):
    """The torch device --device names ("auto": cuda where there is one, else cpu), checked before anything
    is loaded onto it: a device this machine lacks is a UsageError, not a traceback from deep inside torch."""
    import torch  # here, not at the top: --help and config errors need no torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return name
    backend = getattr(torch, device.type) if device.type in ("cuda", "mps", "xpu") else None
    if backend is None:
        raise UsageError(f"--device {name} is not supported here; use auto, cpu, cuda, cuda:N or mps")
    if not backend.is_available():
        raise UsageError(f"--device {name} is not available on this machine (torch finds no {device.type} device); "
                         "use --device cpu")
    if device.index is not None and device.index >= backend.device_count():
        raise UsageError(f"--device {name}: this machine has {backend.device_count()} {device.type} device(s), "
                         f"numbered from 0; use --device {device.type}:0")
    return name


def parse_list(key, value, kind, default):
    """The list option --key as a list of `kind` (int, float or str): `value` may be one value, a tuple/list
    (what configure makes of --steps 1,2,4) or a comma-separated string; None is a copy of `default`.
    An int takes whole numbers only (1.5 is refused, 1.0 is 1), a number is never a boolean, and an empty
    list is refused: each a one-line UsageError naming --key."""
    if value is None:
        return list(default)
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        if kind is str:
            out.append(str(item).strip())
            continue
        try:
            number = float(item)
        except (TypeError, ValueError):
            raise UsageError(f"--{key} must be a number or a comma-separated list of numbers, got {value!r}") from None
        if isinstance(item, bool) or (kind is int and not number.is_integer()):
            raise UsageError(f"--{key} takes {'whole ' if kind is int else ''}numbers, got {item!r}")
        out.append(kind(number))
    if not out:
        raise UsageError(f"--{key} is empty")
    return out


def duration(seconds):
    """A short human duration for the scripts' progress lines: 45s, 12m05s, 3h07m."""
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _typed(what, value, default):
    """`value` as the setting whose default is `default`, an int widened to a float; a value of
    another type than the default's is a UsageError starting with `what`. None, as the default or
    the value, goes with anything (such defaults are resolved by the script)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UsageError(f"{what} must be True or False, got {value!r}")
        return value
    if isinstance(default, float) and type(value) is int:  # not a bool, though bool subclasses int
        return float(value)
    if not isinstance(value, type(default)) or isinstance(value, bool):
        raise UsageError(f"{what} must be of type {type(default).__name__}, got {value!r}")
    return value


def _parse(key, text, default):
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare word is a string: --solver midpoint
    if isinstance(default, str) and not isinstance(value, str):
        return text  # a string option takes other literals as typed: --start 12 is the prompt "12"
    return _typed(f"--{key}", value, default)


def _run_config_file(path, config, defaults):
    try:
        with open(path, encoding="utf-8") as f:
            code = compile(f.read(), path, "exec")
    except FileNotFoundError:
        raise UsageError(f"config file {path} not found") from None
    except IsADirectoryError:
        raise UsageError(f"config file {path} is a folder; pass a Python file such as config/quick.py") from None
    except SyntaxError as e:
        raise UsageError(f"config file {path}, line {e.lineno}: {e.msg} (it must be Python: key = value)") from None
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, null bytes
        raise UsageError(f"cannot read config file {path}: {e}") from None
    values = {}
    try:
        exec(code, {}, values)
    except Exception as e:  # whatever the file runs into: name its line, not a traceback into this module
        tb, line = e.__traceback__, "?"
        while tb:  # the innermost frame of the file itself (it may exec another file, which has no name)
            if tb.tb_frame.f_code.co_filename == path:
                line = tb.tb_lineno
            tb = tb.tb_next
        message = " ".join(str(e).split())  # one line, whatever the exception's text
        raise UsageError(f"config file {path}, line {line}: {type(e).__name__}: {message}") from None
    for key, value in values.items():
        if key.startswith("_") or callable(value) or type(value).__name__ == "module":
            continue
        if key not in config:
            raise UsageError(f"{path} sets unknown key {key!r}")
        config[key] = _typed(f"{key} in {path}", value, defaults[key])


def _documented_keys(path, defaults):
    """{key: (heading lines above it, its meaning)} from the comments of the `dict(...)` in the
    source file `path` whose keywords are those of `defaults`; {} where there is none."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    block = next((node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)
                  and isinstance(node.func, ast.Name) and node.func.id == "dict"
                  and [k.arg for k in node.keywords] == list(defaults)), None)
    if block is None:
        return {}
    trailing, whole = {}, {}  # line number -> comment text
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        row = tok.start[0]
        if tok.type == tokenize.COMMENT and block.lineno <= row <= block.end_lineno:
            text = tok.string.lstrip("#").strip()
            (trailing if tok.line[:tok.start[1]].strip() else whole)[row] = text
    documented, after = {}, block.lineno
    for kw in block.keywords:
        heading = [whole[row] for row in range(after + 1, kw.lineno) if row in whole]
        documented[kw.arg] = (heading, trailing.get(kw.value.end_lineno, ""))
        after = kw.value.end_lineno
    return documented


def _usage(doc):
    """The summary of a module docstring: its first paragraph and the example commands (paragraphs
    of indented lines) right after it."""
    paragraphs = textwrap.dedent(doc or "").strip("\n").split("\n\n")
    shown = paragraphs[:1]
    for paragraph in paragraphs[1:]:
        if not all(line.startswith(" ") for line in paragraph.splitlines()):
            break
        shown.append(paragraph)
    return "\n\n".join(shown)


def _help(defaults, path, doc, spec=None):
    """The text of --help for the script at `path` with module docstring `doc`."""
    script = os.path.basename(path) if spec is None or "." not in spec.name else f"-m {spec.name}"
    documented = _documented_keys(path, defaults)
    keys = [k for k in defaults if not k.startswith("_")]
    key_width = max(len(k) for k in keys) + 2
    value_width = min(16, max(len(repr(defaults[k])) for k in keys))  # a longer default gets its own line
    indent = " " * (2 + key_width + 2 + value_width + 2)
    out = [f"usage: python {script} [CONFIG_FILE.py ...] [--key=value | --key value ...]", "", _usage(doc), "",
           textwrap.fill(f"Config files (Python assignments, key = value) and --key options apply in order, later "
                         f"ones winning; values are Python literals of the default's type, and a bare --flag sets a "
                         f"True/False option to True. More in the docstring of {script}.", HELP_WIDTH), "",
           "options (default, meaning):"]
    for key in keys:
        heading, meaning = documented.get(key, ([], ""))
        if heading:
            out += [""] + [f"  {line}" for line in heading]
        lead = f"  {'--' + key:<{key_width}}  {defaults[key]!r:<{value_width}}  "
        lines = textwrap.wrap(meaning, HELP_WIDTH - len(indent), break_on_hyphens=False) or [""]
        if len(lead) > len(indent):
            out.append(lead.rstrip())
            lead = indent
        out.append((lead + lines[0]).rstrip())
        out += [indent + line for line in lines[1:]]
    return "\n".join(out)


def configure(defaults, argv=None):
    """Return a copy of `defaults` updated by the config files and overrides in argv; with -h or
    --help anywhere in argv, print the calling script's help and exit."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        caller = sys._getframe(1).f_globals  # the script's module: its source holds the comments
        try:
            print(_help(defaults, caller["__file__"], caller["__doc__"], caller.get("__spec__")), flush=True)
        except BrokenPipeError:  # `--help | head` stopped reading: no traceback, and none at exit's flush
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    config = dict(defaults)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            _run_config_file(arg, config, defaults)
            continue
        key, eq, text = arg[2:].partition("=")
        if key not in config:
            known = ", ".join("--" + k for k in config if not k.startswith("_"))
            raise UsageError(f"unknown option --{key} (known: {known}; -h lists them)")
        if not eq:
            if isinstance(config[key], bool) and (not args or args[0].startswith("--")):
                text = "True"  # a bare flag: --chat
            elif not args:
                raise UsageError(f"--{key} needs a value")
            else:
                text = args.pop(0)
        config[key] = _parse(key, text, defaults[key])
    return config
