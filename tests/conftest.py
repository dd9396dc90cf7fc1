import os
import pathlib

import pytest

from neuclip_ds.extensions import extensions_dir  # the standard library only: nothing reads the variables yet

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# DeepSpeed's shm op is built into this venv, not the cache every venv shares (neuclip_ds/extensions.py); the
# launched runs inherit the variable.
extensions_dir()


@pytest.fixture(scope="session")
def default_digits():
    """The embedded data set where `make train` and configs/tiny-neuclip.yaml expect it (data/digits, ignored by
    git): built here if `make data` has not run (a clean clone's `make test`), reused otherwise."""
    from neuclip_ds.data.embedded import build_embedded_dataset

    out = pathlib.Path(__file__).resolve().parents[1] / "data" / "digits"
    build_embedded_dataset(out)
    return out


@pytest.fixture(scope="session")
def small_digits(tmp_path_factory):
    """A small embedded data set (192 training pairs in 6 shards of 32) for runs on real webdataset shards."""
    from neuclip_ds.data.embedded import build_embedded_dataset

    root = tmp_path_factory.mktemp("digits_small")
    build_embedded_dataset(root, seed=0, n_train=192, n_val=32, samples_per_shard=32)
    return root
