import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# DeepSpeed's shm op is built into this venv, not the cache every venv shares (neuclip_ds/extensions.py); the
# launched runs inherit the variable.
from neuclip_ds.extensions import extensions_dir  # noqa: E402

extensions_dir()
