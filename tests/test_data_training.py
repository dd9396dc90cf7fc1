"""Bad input reaching the trainer: counted into metrics.jsonl, and a run past --max-bad-fraction stops on every
rank with one clear message (2 ranks: no rank may hang in a collective)."""

import io
import itertools
import json
import tarfile

from neuclip_ds.launch import launch, metrics

ARGS = (
    "--steps 6 --global-batch-size 16 --npn-prototypes 32 --npn-inner-steps 2 --ds-config ds_configs/zero2.json"
    " --train-num-samples 192"
).split()


def rewrite(path, damage):
    """Copy a tar, passing each member (name, bytes) through damage -> bytes or None (drop)."""
    members = []
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            members.append((m.name, tf.extractfile(m).read()))
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            data = damage(name, data)
            if data is None:
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def copy_shards(small_digits, tmp_path):
    """The six small_digits train shards, copied to tmp_path/data (the tests damage them)."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):
        (data / f"{i:05d}.tar").write_bytes((small_digits / "train" / f"{i:05d}.tar").read_bytes())
    return data


def data_args(data, small_digits, out, more: str) -> list[str]:
    """ARGS on the copied shards, writing to `out`, then `more` (a command line)."""
    shards, tokenizer = f"{data}/{{00000..00005}}.tar", str(small_digits / "tokenizer")
    return [*ARGS, "--train-data", shards, "--tokenizer", tokenizer, "--output-dir", str(out), *more.split()]


def test_bad_samples_reach_metrics(small_digits, tmp_path):
    data = copy_shards(small_digits, tmp_path)
    # one undecodable image and one empty caption
    rewrite(data / "00002.tar", lambda n, d: b"not a jpeg" if n.endswith("train_0000070.jpg") else d)
    rewrite(data / "00004.tar", lambda n, d: b" " if n.endswith("train_0000140.txt") else d)
    out = tmp_path / "run"
    launch(data_args(data, small_digits, out, "--steps 24"), nproc=2)  # 2 epochs of 12 steps
    rows = metrics(out)
    assert rows[-1]["bad_samples"] >= 2  # both seen in the first epoch (counts arrive with the next batch)
    assert all(a["bad_samples"] <= b["bad_samples"] for a, b in itertools.pairwise(rows))


def test_too_many_bad_samples_stop_every_rank(small_digits, tmp_path):
    data = copy_shards(small_digits, tmp_path)
    for i in (0, 3):  # a third of the images undecodable
        rewrite(data / f"{i:05d}.tar", lambda n, d: b"junk" if n.endswith(".jpg") else d)
    proc = launch(
        data_args(data, small_digits, tmp_path / "run", "--steps 40 --max-bad-fraction 0.05"),
        nproc=2,
        check=False,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "samples were bad" in proc.stderr and "--max-bad-fraction 5.0%" in proc.stderr


def test_fastclip_index_outside_dataset_size_is_skipped_not_fatal(small_digits, tmp_path):
    """FastCLIP's u tables have --dataset-size rows: a sample indexed past them (or negative) would stop both
    ranks with a ValueError in the loss, so the loader skips it and counts it as bad_index."""
    data = copy_shards(small_digits, tmp_path)

    def reindex(member: str, index: int):
        return lambda n, d: json.dumps(dict(json.loads(d), index=index)).encode() if n.endswith(member) else d

    rewrite(data / "00001.tar", reindex("train_0000040.json", 192))
    rewrite(data / "00004.tar", reindex("train_0000130.json", -1))
    out = tmp_path / "run"
    proc = launch(
        data_args(data, small_digits, out, "--loss fastclip --dataset-size 192 --steps 14"), nproc=2
    )  # one epoch is 12 steps: every sample was read
    assert "(index 192, the data set has 192)" in proc.stderr and "(index -1, the data set has 192)" in proc.stderr
    assert metrics(out)[-1]["bad_samples"] >= 2
