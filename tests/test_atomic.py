"""The one atomic write (neuclip_ds.atomic) and the distributed helpers' one-process behaviour."""

import functools

import pytest
import torch

from neuclip_ds import distributed
from neuclip_ds.atomic import atomic_path, atomic_write


def test_atomic_write_text_bytes_and_writer(tmp_path):
    assert atomic_write(tmp_path / "a.txt", "step00000010\n") == tmp_path / "a.txt"
    assert (tmp_path / "a.txt").read_text() == "step00000010\n"
    atomic_write(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    atomic_write(tmp_path / "c.pt", functools.partial(torch.save, {"x": torch.ones(2)}))
    assert torch.equal(torch.load(tmp_path / "c.pt")["x"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "c.pt"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "latest"
    target.write_text("old\n")

    def fails(tmp):
        tmp.write_text("half")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, fails)
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_one_process_is_rank_0_of_1():
    assert (distributed.rank(), distributed.world_size(), distributed.is_distributed()) == (0, 1, False)
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    assert distributed.max_over_ranks(15) == 15
    assert distributed.gather_objects({"a": 1}) == [{"a": 1}]
    assert distributed.from_rank0(lambda: 7) == 7
    with pytest.raises(KeyError):
        distributed.from_rank0(lambda: {}["missing"])
    with pytest.raises(ValueError, match="rank 0: KeyError"):
        distributed.from_rank0(lambda: {}["missing"], error=lambda e: ValueError(f"rank 0: {type(e).__name__}"))
