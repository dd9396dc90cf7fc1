"""`python -m neuclip_ds.ds_to_universal ARGS`: DeepSpeed's ds_to_universal (same arguments), with every file it
reads loaded as data (`checkpoint.files_read_as_data`: it calls `torch.load(weights_only=False)` itself).

`checkpoint.to_universal` runs it in a subprocess; a refused file ends it with that one line on stderr, exit 2.
"""

from __future__ import annotations

import sys

from .checkpoint import CheckpointError, files_read_as_data


def main() -> int:
    from deepspeed.checkpoint import ds_to_universal

    args = ds_to_universal.parse_arguments()
    try:
        with files_read_as_data():
            ds_to_universal.main(args)
    except CheckpointError as e:
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
