"""configurator.py: the command-line forms every script accepts."""

import glob
import os

import pytest

from configurator import UsageError, configure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULTS = dict(steps=1, lr=1e-4, solver="midpoint", start="\n", chat=False, datasets=["a"], atol=None)


def test_both_forms_and_types():
    cfg = configure(DEFAULTS, ["--steps", "8", "--lr=3e-4", "--solver", "dopri5", "--datasets=['x', 'y']"])
    assert cfg == dict(DEFAULTS, steps=8, lr=3e-4, solver="dopri5", datasets=["x", "y"])


def test_string_options_keep_what_was_typed():
    assert configure(DEFAULTS, ["--start", "12"])["start"] == "12"          # not the int 12
    assert configure(DEFAULTS, ["--solver='euler'"])["solver"] == "euler"  # a quoted literal is unquoted
    assert configure(DEFAULTS, ["--lr", "1"])["lr"] == 1.0                  # ints widen to float


def test_bare_boolean_flag_and_explicit_value():
    assert configure(DEFAULTS, ["--chat"])["chat"] is True
    assert configure(DEFAULTS, ["--chat", "--steps", "2"]) == dict(DEFAULTS, chat=True, steps=2)
    assert configure(DEFAULTS, ["--chat=False"])["chat"] is False


def test_config_file_then_override(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("steps = 4\nsolver = 'rk4'\n")
    assert configure(DEFAULTS, [str(path), "--steps=6"]) == dict(DEFAULTS, steps=6, solver="rk4")


@pytest.mark.parametrize("argv,match", [(["--nonsense=1"], "unknown option --nonsense"),
                                        (["--steps=two"], "--steps must be a int"),
                                        (["--chat=3"], "True or False"),
                                        (["--steps"], "needs a value"),
                                        (["missing_config.py"], "not found")])
def test_mistakes_are_usage_errors(argv, match):
    with pytest.raises(UsageError, match=match):
        configure(DEFAULTS, argv)


def test_config_file_with_unknown_key(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("stepz = 4\n")
    with pytest.raises(UsageError, match="unknown key 'stepz'"):
        configure(DEFAULTS, [str(path)])


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "config", "*.py"))))
def test_every_recipe_configures_train(path, monkeypatch):
    """Each config/*.py sets only known keys of train.py with the right types; a baseline recipe that
    reads another keeps its data, batch and steps."""
    import train
    monkeypatch.chdir(ROOT)  # recipes exec their sibling by a relative path, as from the repo root
    cfg = configure(train.DEFAULTS, [os.path.relpath(path, ROOT)])
    assert cfg["method"] in train.METHODS
    name = os.path.basename(path)
    if name.startswith(("lora_", "full_", "lab_lora", "lab_full", "lab_ar")):
        sibling = name.replace("lora", "l2d").replace("full", "l2d").replace("lab_ar", "lab_l2d")
        other = configure(train.DEFAULTS, [os.path.join("config", sibling)])
        for key in ("datasets", "init_from", "batch_size", "max_iters", "warmup_iters"):
            assert cfg[key] == other[key], key
        assert cfg["method"] != other["method"] and cfg["out_dir"] != other["out_dir"]
