"""neuclip_ds: a DeepSpeed trainer for CLIP models with the NeuCLIP method.

Module map (one concern each; dependencies point one way):
    presets  -> model, losses, npn  -> engine -> train
    launch: neuclip-train runs in subprocesses (N ranks, CPU env, timeouts), for the tests and benchmarks
See docs/design.md for the architecture, docs/method.md for the equations (E1-E9) and docs/pitfalls.md.
"""

__version__ = "0.1.0"
