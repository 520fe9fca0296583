"""configurator.py: the command-line forms every script accepts, --help, and bad config files."""

import glob
import importlib
import os
import re
import sys
import textwrap

import pytest

import forkrun
from configurator import UsageError, configure, defaults, parse_list

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OPTIONS = {key: (default, f"the {key}") for key, default in dict(steps=1, lr=1e-4, solver="midpoint", start="\n", chat=False,
                                                                   datasets=["a"], atol=None).items()}
DEFAULTS = defaults(OPTIONS)


def test_parse_list_takes_one_value_a_tuple_or_a_comma_separated_string():
    assert parse_list("steps", "1,2,4", int, []) == [1, 2, 4]
    assert parse_list("steps", (1, 2, 4), int, []) == [1, 2, 4]  # what configure makes of --steps 1,2,4
    assert parse_list("steps", 8, int, []) == [8]
    assert parse_list("steps", "1.0, 2", int, []) == [1, 2]
    assert parse_list("guidance", "1,1.5", float, []) == [1.0, 1.5]
    assert parse_list("methods", "lora, full", str, []) == ["lora", "full"]
    default = [1, 16]
    got = parse_list("batch_sizes", None, int, default)
    assert got == default and got is not default  # a copy: the caller may change it


@pytest.mark.parametrize("value, kind, match", [
    ("1.5", int, "--steps takes whole numbers, got '1.5'"),
    ("a,b", int, "--steps must be a number or a comma-separated list of numbers, got 'a,b'"),
    ("", int, "--steps must be a number"),
    (True, int, "--steps takes whole numbers, got True"),
    ((1, False), float, "--steps takes finite numbers, got False"),
    ((), int, "--steps is empty"),
    ([], str, "--steps is empty"),
])
def test_parse_list_refuses(value, kind, match):
    with pytest.raises(UsageError, match=re.escape(match)):
        parse_list("steps", value, kind, [1])


def test_both_forms_and_types():
    cfg = configure(OPTIONS, ["--steps", "8", "--lr=3e-4", "--solver", "dopri5", "--datasets=['x', 'y']"])
    assert cfg == dict(DEFAULTS, steps=8, lr=3e-4, solver="dopri5", datasets=["x", "y"])


def test_string_options_keep_what_was_typed():
    assert configure(OPTIONS, ["--start", "12"])["start"] == "12"          # not the int 12
    assert configure(OPTIONS, ["--solver='euler'"])["solver"] == "euler"  # a quoted literal is unquoted
    assert configure(OPTIONS, ["--lr", "1"])["lr"] == 1.0                  # ints widen to float


def test_bare_boolean_flag_and_explicit_value():
    assert configure(OPTIONS, ["--chat"])["chat"] is True
    assert configure(OPTIONS, ["--chat", "--steps", "2"]) == dict(DEFAULTS, chat=True, steps=2)
    assert configure(OPTIONS, ["--chat=False"])["chat"] is False


def test_config_file_then_override(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("steps = 4\nsolver = 'rk4'\n")
    assert configure(OPTIONS, [str(path), "--steps=6"]) == dict(DEFAULTS, steps=6, solver="rk4")


@pytest.mark.parametrize("argv,match", [(["--nonsense=1"], "unknown option --nonsense"),
                                        (["--steps=two"], "--steps must be of type int"),
                                        (["--steps=True"], "--steps must be of type int"),
                                        (["--chat=3"], "True or False"),
                                        (["--steps"], "needs a value"),
                                        (["missing_config.py"], "not found")])
def test_mistakes_are_usage_errors(argv, match):
    with pytest.raises(UsageError, match=match):
        configure(OPTIONS, argv)


def test_config_file_with_unknown_key(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("stepz = 4\n")
    with pytest.raises(UsageError, match="unknown key 'stepz'"):
        configure(OPTIONS, [str(path)])


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "config", "*.py"))))
def test_every_recipe_configures_train(path, monkeypatch):
    """Each config/*.py sets only known keys of train.py with the right types; a baseline recipe that
    reads another keeps its data, batch and steps."""
    import train
    monkeypatch.chdir(ROOT)  # recipes exec their sibling by a relative path, as from the repo root
    cfg = configure(train.OPTIONS, [os.path.relpath(path, ROOT)])
    assert cfg["method"] in train.OPTIONS["method"][2]
    name = os.path.basename(path)
    same = ("datasets", "init_from", "batch_size", "max_iters", "warmup_iters")
    if name.startswith(("lora_", "full_", "ar2diff_", "lab_lora", "lab_full", "lab_ar.py", "lab_ar2diff.py")):
        sibling = name.replace("ar2diff", "l2d").replace("lora", "l2d").replace("full", "l2d").replace("lab_ar.", "lab_l2d.")
    elif name == "lab_ar2diff_n.py":  # AR2Diff_N: lab_ar2diff.py from the base after the diffusion loss on generic data
        sibling, same = "lab_ar2diff.py", ("datasets", "batch_size", "max_iters", "warmup_iters", "learning_rate")
        assert cfg["init_from"] == "out-lab-ar2diff-pre/ckpt.pt"
    else:
        return
    other = configure(train.OPTIONS, [os.path.join("config", sibling)])
    for key in same:
        assert cfg[key] == other[key], key
    assert cfg["out_dir"] != other["out_dir"]
    assert cfg["method"] != other["method"] or name == "lab_ar2diff_n.py"


SCRIPTS = ["train.py", "sample.py", "eval.py", "-m harness.bench"]


def run_script(*args, cwd=ROOT):
    return forkrun.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))


def option_meaning(help_text, key, default):
    """The meaning --help gives `--key` after its default's repr (on the same line, or the next one
    when the default is too long for its column); None if the option is not listed so."""
    match = re.search(rf"^  --{key} +{re.escape(repr(default))}(?: +|\n +)(?!--)(\S.*)$", help_text, re.M)
    return match and match.group(1)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_option_with_default_and_meaning(script):
    module = importlib.import_module(script.split()[-1].removesuffix(".py"))  # importing a script only defines things
    result = run_script(*script.split(), "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python {script} ")
    assert module.__doc__.strip().splitlines()[0] in result.stdout  # the docstring's summary
    for key, default in defaults(module.OPTIONS).items():
        if key.startswith("_"):  # internal: not for users
            assert f"--{key}" not in result.stdout
        else:
            assert option_meaning(result.stdout, key, default), f"--{key} lacks its default or a comment in {script}"
    options = result.stdout.split("options (default, meaning):\n")[1]
    assert max(len(line) for line in options.splitlines()) <= 100


def test_help_wins_over_other_arguments_and_needs_no_data(tmp_path):
    """-h anywhere prints help and runs nothing: not the config file, not the unknown option."""
    result = run_script("train.py", "config/quick.py", "--nonsense=1", "--datasets=['/nowhere']", "-h")
    assert result.returncode == 0 and result.stderr == ""
    assert option_meaning(result.stdout, "max_iters", 1000) == "optimizer steps"


def test_help_shows_the_declared_table(tmp_path):
    """The docstring's first paragraph and the example commands after it, then each option with its default
    and meaning, from the script's OPTIONS; keys starting with "_" are internal."""
    (tmp_path / "tool.py").write_text(textwrap.dedent('''\
        """
        Do a thing.

            python tool.py --n 3

        Details nobody needs in --help.
        """
        import sys
        sys.path.insert(0, sys.argv.pop(1))
        from configurator import configure

        OPTIONS = dict(
            n=(1, "how many times"),
            color=("#fff", "colour of the line"),  # a "#" inside a string is no comment
            _secret=(0, "internal"),
        )
        configure(OPTIONS)
    '''))
    result = run_script("tool.py", ROOT, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("usage: python tool.py ")
    assert "Do a thing.\n\n    python tool.py --n 3" in out and "Details" not in out
    assert option_meaning(out, "n", 1) == "how many times"
    assert option_meaning(out, "color", "#fff") == "colour of the line"
    assert "_secret" not in out and "internal" not in out


@pytest.mark.parametrize("text", ["nan", "inf", "1e400", "-inf"])
def test_a_float_option_must_be_finite(text):
    with pytest.raises(UsageError, match=f"--lr must be a finite number, got"):
        configure(OPTIONS, ["--lr", text])
    with pytest.raises(UsageError, match="--steps takes finite numbers"):
        parse_list("steps", text, float, [1.0])


# --- bad config files ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text,match", [
    ("steps = 4\nsolver = 'rk4'\nstart = 12\n", "start in .* must be of type str, got 12"),
    ("steps = 2.5\n", "steps in .* must be of type int, got 2.5"),
    ("chat = 1\n", "chat in .* must be True or False, got 1"),
    ("datasets = 'x'\n", "datasets in .* must be of type list"),
    ("steps = 4\nlr = (\n", r"c.py, line 2: .*\(it must be Python"),
    ("steps = 4\nlr = 1 / 0\n", "c.py, line 2: ZeroDivisionError: division by zero"),
    ("exec(open('missing_sibling.py').read())\n", "c.py, line 1: FileNotFoundError: .*missing_sibling.py"),
])
def test_bad_config_file(tmp_path, text, match):
    path = tmp_path / "c.py"
    path.write_text(text)
    with pytest.raises(UsageError, match=match):
        configure(OPTIONS, [str(path)])


def test_config_file_types_follow_the_command_line_rules(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("lr = 1\natol = [1e-3, 1e-4]\nchat = True\nsteps = None\n")
    cfg = configure(OPTIONS, [str(path)])
    assert cfg == dict(DEFAULTS, lr=1.0, atol=[1e-3, 1e-4], chat=True, steps=None)
    assert type(cfg["lr"]) is float  # an int widens to the float default


def test_config_file_that_is_a_folder(tmp_path):
    with pytest.raises(UsageError, match=f"config file {tmp_path} is a folder"):
        configure(OPTIONS, [str(tmp_path)])


@pytest.mark.parametrize("text,expect", [("max_iters = 10\nlearning_rate = 1e-3 +\n", ", line 2: "),
                                         ("max_iters = 10\nlearning_rate = lr\n", ", line 2: NameError"),
                                         ("max_iters = '10'\n", "max_iters in "),
                                         (None, "is a folder")])
def test_train_reports_a_bad_config_file_in_one_line(tmp_path, text, expect):
    path = tmp_path / "bad.py"
    if text is None:
        path.mkdir()
    else:
        path.write_text(text)
    result = run_script("train.py", str(path), "--max_iters=1")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert str(path) in lines[0] and expect in lines[0]
