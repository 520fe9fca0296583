"""Nothing a user has is overwritten or lost: the one writer (loading/files.py) refuses a user's file
at a user-named output path before any work, keeps the old file whole when a write fails (a full
disk, a read-only file system), and a checkpoint with a non-finite weight is never written."""
import errno
import json
import os

import pytest
import torch

from harness import bench
from loading.checkpoint import save_checkpoint
from loading.files import OutputError, check_output, write_atomic

TINY_BENCH = ["--init_from=scratch", "--n_layer=1", "--n_embd=16", "--n_head=2", "--vocab_size=32", "--block_size=32",
              "--flow_dim=8", "--lora_rank=2", "--prompt_len=4", "--new_tokens=1", "--eval_reps=1", "--steps=1",
              "--batch_sizes=1", "--dtypes=float32", "--what=gen", "--matmul_n=16", "--seq=8", "--batch=1"]


def test_bench_refuses_to_write_over_a_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(str(ckpt), dict(state_dict={"w": torch.ones(2)}))
    before = ckpt.read_bytes()
    with pytest.raises(OutputError, match=r"--out .*ckpt.pt already exists and was not written by this tool.*--overwrite"):
        bench.main(TINY_BENCH + [f"--out={ckpt}"])
    assert ckpt.read_bytes() == before


def test_bench_replaces_its_own_earlier_result_and_anything_with_overwrite(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(TINY_BENCH + [f"--out={out}"])
    first = json.loads(out.read_text())
    assert bench.is_bench_json(str(out))
    bench.main(TINY_BENCH + [f"--out={out}", "--seed=1"])  # its own output: no --overwrite needed
    assert json.loads(out.read_text())["config"]["seed"] == 1 != first["config"]["seed"]
    other = tmp_path / "notes.json"
    other.write_text('{"mine": 1}')
    bench.main(TINY_BENCH + [f"--out={other}", "--overwrite"])
    assert bench.is_bench_json(str(other))


@pytest.mark.parametrize("how", ["folder", "missing_folder", "read_only_folder"])
def test_check_output_refuses_unwritable_paths_before_any_work(how, tmp_path):
    path = {"folder": tmp_path, "missing_folder": tmp_path / "nope" / "x.json",
            "read_only_folder": tmp_path / "ro" / "x.json"}[how]
    if how == "read_only_folder":
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o500)
        if os.access(tmp_path / "ro", os.W_OK):
            pytest.skip("root ignores folder permissions here")
    with pytest.raises(OutputError, match="--out"):
        check_output(str(path), "--out")


@pytest.mark.parametrize("code,why", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "the file system is read-only")])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(code, why, tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")

    def full_disk(f):
        f.write(b"half of it")
        raise OSError(code, "simulated")

    with pytest.raises(OutputError, match=f"cannot write {path}: {why}; the previous file is unchanged"):
        write_atomic(str(path), full_disk)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_checkpoint_with_a_non_finite_weight_is_never_written(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(str(path), dict(state_dict={"w": torch.ones(3)}, iter_num=1))
    with pytest.raises(ValueError, match=r"not saving .*ckpt.pt: 1 weight tensor\(s\) are not finite \(w, \.\.\.\); "
                                         r".*keeps the last good checkpoint"):
        save_checkpoint(str(path), dict(state_dict={"w": torch.tensor([1.0, float("nan"), 2.0])}, iter_num=2))
    assert torch.load(path, weights_only=True)["iter_num"] == 1
    with pytest.raises(ValueError, match="no checkpoint was written"):
        save_checkpoint(str(tmp_path / "new.pt"), dict(state_dict={"w": torch.tensor([float("inf")])}))
    assert not (tmp_path / "new.pt").exists()


def test_a_full_disk_during_prepare_keeps_the_prepared_folder(tmp_path, monkeypatch):
    """data/dataset.py stages the folder beside it and moves it in whole: a failed write is one line and
    leaves the previous dataset as it was (simulated: np.savez writes half a file, then ENOSPC)."""
    from data import dataset
    from test_data import arithmetic
    out = arithmetic.prepare("char", out=str(tmp_path / "data"), n_train=20, n_test=5, digits=1, ops="+")
    before = {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()}

    def full_disk(path, **arrays):
        open(path, "wb").write(b"half of it")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dataset.np, "savez", full_disk)
    with pytest.raises(OutputError, match=f"^cannot write {out}: the disk is full; the previous folder is unchanged$"):
        arithmetic.prepare("char", out=out, n_train=30, n_test=5, digits=1, ops="+", overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()} == before
    assert os.listdir(tmp_path) == ["data"]
