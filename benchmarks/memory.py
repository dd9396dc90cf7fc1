"""Issue 8.3 "Memory": per-rank ZeRO model-state bytes and the loss's peak memory, measured side by side.

    python benchmarks/memory.py                          # ViT-B-32 fp32, ZeRO 1/2/3 x 1/2 ranks; loss at B = 4k..16k
    python benchmarks/memory.py --quick                  # tiny preset, loss at B = 1k..4k (a few minutes on 2 cores)
    python benchmarks/memory.py --md benchmarks/results/memory.md   # also write the printed tables there

1. Model states. For each (ZeRO stage, world size) one worker (this file with --worker zero; the deepspeed launcher
   for 2 ranks, CPU/gloo) builds the preset with neuclip_ds's build_model / build_optimizer / build_ds_config and
   ds_configs/zero{1,2,3}.json, runs one full step (so Adam's states exist), then the forward and backward of a
   second step, and counts -- before that step's optimizer update, when parameters, gradients and optimizer
   states are all alive -- the bytes of the tensors the rank holds, each storage once (by data_ptr):
     params   module parameters: the flat buffer they are views of (ZeRO-1/2), param.ds_tensor (ZeRO-3) plus
              the full data of ZeRO-3's persistent (small, unpartitioned) parameters
     master   the fp32 partition the optimizer steps (single_partition_of_fp32_groups / fp32_partitioned_groups_flat).
              In fp32 it is a second copy at every stage: ZeRO-3 means to reuse the parameter partition when dtype
              and device match, but DeepSpeed 0.19.8 compares torch.device to the device-name string, never equal
     grads    param.grad and every tensor under a ZeRO-optimizer attribute named *grad* (averaged_gradients,
              grads_in_partition, grad_partitions_flat_buffer, ...)
     optim    the tensors in the wrapped torch optimizer's state (AdamW exp_avg, exp_avg_sq, step)
     buffers  any other tensor the ZeRO optimizer holds: mostly the reduce bucket (ZeRO-3 allocates
              reduce_bucket_size = 5e8 elements = 1.9 GiB fp32 at init, whatever the world size). Not a model
              state, so not in the ratio; torch.empty is virtual on CPU (not in RSS) but real memory on a GPU.
   Cross-checks: all live CPU tensors the garbage collector sees (storages deduplicated), the process RSS above its
   baseline before the model was built, and the RSS peak (VmHWM). DeepSpeed's estimators (the functions behind
   estimate_zero{2,3}_model_states_mem_needs_all_cold, no offload, "per GPU") assume mixed precision: 2-byte
   params and grads plus fp32 grads, master and Adam = 2P + 18P/W (ZeRO-2), 4 x largest layer + 18P/W (ZeRO-3).
   We train fp32, where the same accounting gives 4P + 16P/W (ZeRO-1/2: full fp32 params + fp32 master, grads
   and Adam partitions) and 20P/W (ZeRO-3: param, master, grad and 2 Adam partitions): column "fp32 formula".
2. Loss peak memory. On 2 ranks (--worker loss), random normalized [b_local, 512] features, no encoders: the
   engine's loss path -- gather_features with gradient, alpha = log(eps + g_hat) from batch_log_normalizers under
   no_grad, NeuCLIPLoss forward and backward. Peak = the process's peak RSS during that call minus its RSS before
   (the kernel's VmHWM after resetting it through /proc/self/clear_refs; a 1 ms RSS sampler where that is not
   allowed). glibc is told to mmap every block >= 64 KiB (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the RSS
   at once and the RSS follows the live bytes, kernel temporaries included. The loss keeps O(b_local x B) memory,
   so peak / (b_local x B x 4 bytes) should stay constant as B grows; a [B, B] fp32 matrix is printed next to it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

from neuclip_ds.launch import cpu_env, launch

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20
TARGET = 0.55  # issue 8.3: ZeRO-3 model states per rank, 2 ranks / 1 rank
EMBED_DIM = 512  # ViT-B-32's embedding width, for the loss benchmark
CATEGORIES = ("params", "master", "grads", "optim")


# ---------------------------------------------------------------------------------------------------------------
# process memory
# ---------------------------------------------------------------------------------------------------------------
def proc_status(key: str) -> int:
    """VmRSS / VmHWM of this process in bytes."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


class PeakRSS:
    """Peak RSS above the RSS at entry, over a `with` block: exact kernel high-water mark when it can be reset,
    else the maximum of a 1 ms sampler."""

    def __enter__(self):
        gc.collect()
        self.start, self._samples, self._stop = proc_status("VmRSS"), [], threading.Event()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # 5: reset VmHWM to the current RSS (Linux >= 4.0)
            self._thread = None
        except OSError:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self._samples.append(proc_status("VmRSS"))

    def __exit__(self, *exc):
        if self._thread is None:
            peak = proc_status("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._samples, default=self.start)
        self.method = "VmHWM" if self._thread is None else "RSS sampler"
        self.bytes = max(peak, proc_status("VmRSS")) - self.start


# ---------------------------------------------------------------------------------------------------------------
# counting the tensors a rank holds
# ---------------------------------------------------------------------------------------------------------------
def tensors_in(obj, depth: int = 0):
    """Tensors in obj, recursing through lists, tuples, dicts and DeepSpeed's own small objects (e.g. IPGBucket);
    never into modules or optimizers (counted separately)."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth > 4 or isinstance(obj, (torch.nn.Module, torch.optim.Optimizer, str, bytes)):
        return
    elif isinstance(obj, (list, tuple, set)):
        for x in obj:
            yield from tensors_in(x, depth + 1)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from tensors_in(x, depth + 1)
    elif type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__"):
        yield from tensors_in(vars(obj), depth + 1)


class StorageCounter:
    """Bytes of distinct storages (keyed by data_ptr): a view, or a tensor two categories share, counts once,
    for the first category that names it."""

    def __init__(self):
        self.seen = set()

    def add(self, tensors) -> int:
        total = 0
        for t in tensors:
            if t is None or t.device.type == "meta":
                continue
            s = t.untyped_storage()
            if s.nbytes() and s.data_ptr() not in self.seen:
                self.seen.add(s.data_ptr())
                total += s.nbytes()
        return total


def model_state_bytes(model, zero_opt, stage: int) -> dict:
    params = list(model.parameters())
    if stage == 3:  # the rank's partition, plus the full data of persistent params (a no-op for gathered-out ones)
        param_tensors = [p.ds_tensor for p in params] + [p.data for p in params]
        master = zero_opt.fp32_partitioned_groups_flat
    else:
        param_tensors, master = [p.data for p in params], zero_opt.single_partition_of_fp32_groups
    zero_attrs = {k: v for k, v in vars(zero_opt).items() if k != "optimizer"}
    grads = (
        [p.grad for p in params]
        + [m.grad for m in master]
        + list(tensors_in({k: v for k, v in zero_attrs.items() if "grad" in k.lower()}))
    )
    count = StorageCounter()
    out = {
        "params": count.add(param_tensors),
        "master": count.add(master),
        "grads": count.add(grads),
        "optim": count.add(tensors_in(zero_opt.optimizer.state)),
    }
    out["model_states"] = sum(out[c] for c in CATEGORIES)
    out["buffers"] = count.add(tensors_in(zero_attrs))
    return out


def live_tensor_bytes() -> int:
    """Every CPU tensor the garbage collector sees, storages deduplicated (a cross-check of the categories)."""
    import torch

    tensors = []
    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor) and o.device.type == "cpu":
                tensors.append(o)
        except Exception:  # some objects raise on isinstance / attribute access
            pass
    return StorageCounter().add(tensors)


# ---------------------------------------------------------------------------------------------------------------
# workers (run by the launcher, one JSON per rank)
# ---------------------------------------------------------------------------------------------------------------
def zero_worker(args) -> dict:
    import deepspeed
    import torch

    from neuclip_ds.config import TrainConfig
    from neuclip_ds.engine import build_ds_config, build_optimizer, init_distributed
    from neuclip_ds.losses import ClipLoss, gather_features
    from neuclip_ds.model import build_model
    from neuclip_ds.presets import get_preset

    info = init_distributed()
    baseline = proc_status("VmRSS")
    cfg = TrainConfig(
        preset=args.preset,
        ds_config=str(ROOT / "ds_configs" / f"zero{args.stage}.json"),
        global_batch_size=args.batch * info.world_size,
        precision="fp32",
        steps=1,
    ).resolve()
    ds = build_ds_config(cfg, info.world_size)
    if args.persistence_threshold is not None:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = args.persistence_threshold
    torch.manual_seed(0)
    model = build_model(args.preset)
    total_params = sum(p.numel() for p in model.parameters())
    largest_layer = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    engine, zero_opt, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg), config=ds)

    preset, loss_fn, g = get_preset(args.preset), ClipLoss(), torch.Generator().manual_seed(info.rank)
    batch = {
        "pixel_values": torch.randn(args.batch, 3, preset.image_size, preset.image_size, generator=g),
        "input_ids": torch.randint(1, preset.vocab_size - 1, (args.batch, preset.context_length), generator=g),
    }

    def forward_backward():
        out = engine(**batch)
        engine.backward(loss_fn(gather_features(out["img"], out["txt"]), out["tau"]))

    forward_backward()
    engine.step()  # Adam's exp_avg / exp_avg_sq exist from here on
    forward_backward()  # gradients of step 2 are held: the moment all model states are alive
    result = {
        **model_state_bytes(model, zero_opt, args.stage),
        "live_tensors": live_tensor_bytes(),
        "rss_delta": proc_status("VmRSS") - baseline,
        "rss_peak": proc_status("VmHWM"),
        "rss_baseline": baseline,
        "total_params": total_params,
        "largest_layer_params": largest_layer,
    }
    engine.step()
    return result


def loss_worker(args) -> dict:
    import torch
    import torch.nn.functional as F

    from neuclip_ds.engine import init_distributed
    from neuclip_ds.losses import Features, NeuCLIPLoss, batch_log_normalizers, gather_features, log_eps_plus

    info = init_distributed()
    loss_fn, results = NeuCLIPLoss(), {}
    # a first, unreported pass at the smallest size takes the one-time allocations (gloo buffers, thread pools)
    for i, B in enumerate([args.sizes[0], *args.sizes]):
        b = B // info.world_size
        g = torch.Generator().manual_seed(B + info.rank)
        img = F.normalize(torch.randn(b, EMBED_DIM, generator=g), dim=-1).requires_grad_()
        txt = F.normalize(torch.randn(b, EMBED_DIM, generator=g), dim=-1).requires_grad_()
        tau = torch.full([1], 0.07, requires_grad=True)
        torch.distributed.barrier()
        with PeakRSS() as peak:  # the engine's loss path (NeuCLIPEngine.train_step, A = 1), encoders left out
            feats = gather_features(img, txt)
            with torch.no_grad():
                detached = Features(
                    img.detach(), txt.detach(), feats.img_all.detach(), feats.txt_all.detach(), feats.offset
                )
                alpha = [log_eps_plus(lg, loss_fn.eps) for lg in batch_log_normalizers(detached, tau)]
            loss_fn(feats, tau, *alpha).backward()
            del feats, detached, alpha
        if i > 0:
            results[str(B)] = {"b_local": b, "peak": peak.bytes, "method": peak.method}
    return results


# ---------------------------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------------------------
def run_workers(worker_args: list[str], nproc: int, timeout: int = 1200) -> list[dict]:
    """Run this file as a worker on nproc CPU ranks (1: the interpreter; more: the deepspeed launcher, gloo) and
    return each rank's JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        # glibc mmaps every block >= 64 KiB, so that freed tensors leave the RSS at once (module docstring)
        env = cpu_env(extra_env={"MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)})
        launch([*worker_args, "--json-dir", tmp], nproc=nproc, script=__file__, env=env, timeout=timeout)
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(nproc)]


def measure_zero(stage: int, nproc: int, *, preset: str, batch: int, persistence_threshold: int | None = None):
    extra = [] if persistence_threshold is None else ["--persistence-threshold", str(persistence_threshold)]
    return run_workers(
        ["--worker", "zero", "--stage", str(stage), "--preset", preset, "--batch", str(batch), *extra], nproc
    )


def measure_loss(sizes: list[int], nproc: int = 2) -> list[dict]:
    return run_workers(["--worker", "loss", "--sizes", *map(str, sizes)], nproc)


def estimates(stage: int, world: int, P: int, largest: int) -> tuple[float | None, float]:
    """(DeepSpeed's mixed-precision estimate per accelerator, our fp32 formula), bytes per rank."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if stage == 3:
        ds = estimate_zero3_model_states_mem_needs(
            P, largest, num_gpus_per_node=world, cpu_offload=False, cpu_offload_params=False
        )[1]
        return ds, 20 * P / world
    ds = estimate_zero2_model_states_mem_needs(P, num_gpus_per_node=world, cpu_offload=False)[1] if stage == 2 else None
    return ds, 4 * P + 16 * P / world


def mib(x) -> str:
    return "-" if x is None else f"{x / MiB:,.1f}"


def zero_table(results: dict) -> list[str]:
    """results[(stage, world)] = list of per-rank dicts -> markdown lines (rank 0's numbers; ranks agree to a few
    bytes of padding)."""
    cols = [
        "stage",
        "ranks",
        "params",
        "master",
        "grads",
        "optim",
        "**model states**",
        "buffers",
        "live tensors",
        "RSS - baseline",
        "RSS peak (abs)",
        "DS estimate (mixed)",
        "fp32 formula",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for (stage, world), ranks in sorted(results.items()):
        r = ranks[0]
        ds, fp32 = estimates(stage, world, r["total_params"], r["largest_layer_params"])
        row = [
            stage,
            world,
            *(mib(r[c]) for c in CATEGORIES),
            f"**{mib(r['model_states'])}**",
            mib(r["buffers"]),
            mib(r["live_tensors"]),
            mib(r["rss_delta"]),
            mib(r["rss_peak"]),
            mib(ds),
            mib(fp32),
        ]
        lines.append("| " + " | ".join(map(str, row)) + " |")
    lines += [
        "",
        "| stage | **model states 2-rank / 1-rank** | fp32 formula | with buffers (allocated) | "
        "(RSS - baseline) ratio | target |",
        "|---|---|---|---|---|---|",
    ]
    for stage in sorted({s for s, _ in results}):
        one, two = results[(stage, 1)][0], results[(stage, 2)][0]
        ratio = two["model_states"] / one["model_states"]
        f1, f2 = (estimates(stage, w, one["total_params"], 0)[1] for w in (1, 2))
        buffered = (two["model_states"] + two["buffers"]) / (one["model_states"] + one["buffers"])
        verdict = f"{'PASS' if ratio <= TARGET else 'FAIL'} (<= {TARGET})" if stage == 3 else "-"
        lines.append(
            f"| {stage} | **{ratio:.3f}** | {f2 / f1:.3f} | {buffered:.3f} | "
            f"{two['rss_delta'] / one['rss_delta']:.3f} | {verdict} |"
        )
    return lines


def loss_table(results: dict) -> list[str]:
    """results[world] = list of per-rank dicts -> markdown lines (the worse rank's peak)."""
    lines = [
        "| ranks | B global | b local | peak / rank (MiB) | peak / (b x B x 4 B) | one [B,B] fp32 (MiB) | "
        "peak / [B,B] fp32 | method |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for world, ranks in sorted(results.items(), reverse=True):
        for B in sorted(ranks[0], key=int):
            peak, b, Bi = max(r[B]["peak"] for r in ranks), ranks[0][B]["b_local"], int(B)
            lines.append(
                f"| {world} | {Bi} | {b} | {mib(peak)} | {peak / (b * Bi * 4):.2f} | {mib(Bi * Bi * 4)} | "
                f"{peak / (Bi * Bi * 4):.2f} | {ranks[0][B]['method']} |"
            )
    return lines


# printed under the tables: what the columns do and do not count (facts of DeepSpeed 0.19.8 / this loss code)
NOTES_ZERO = [
    "- Snapshot after step 2's backward, before its update: params, grads and Adam states all alive. ZeRO-1 and",
    "  ZeRO-2 look alike there: with contiguous_gradients both reduce into the rank's gradient partition during",
    "  backward. Not counted: activations, and build_model's full copy that deepspeed.initialize frees (RSS peak).",
    "- buffers = ZeRO-3's reduce bucket, reduce_bucket_size = 5e8 elements (1.9 GiB fp32) per rank at any world",
    "  size; on CPU only the part it fills is resident (about P x 4 bytes, hence the RSS ratio), on a GPU all",
    "  of it is allocated. A smaller reduce_bucket_size in the ds config shrinks it.",
    "- DS estimate = DeepSpeed's formula for mixed precision (2-byte params and grads, see the module doc); fp32",
    "  formula = 4P + 16P/W (ZeRO-1/2), 20P/W (ZeRO-3: its fp32 master is a second copy of the partition).",
]
NOTES_LOSS = [
    "- peak = max over ranks of the process's peak RSS above its RSS before the call (VmHWM reset through",
    "  /proc/self/clear_refs; freed tensors leave the RSS at once: MALLOC_MMAP_THRESHOLD_=65536). It includes",
    "  the no-grad g_hat pass for alpha, the graph the loss keeps for backward and the backward's temporaries.",
    "- 1 rank (b = B) shows the same constant: the memory is O(b_local x B), i.e. 1/W of the [B, B] problem.",
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny preset, loss at B = 1k..4k: a few minutes")
    p.add_argument("--preset", default=None, help="default ViT-B-32 (--quick: tiny)")
    p.add_argument("--batch", type=int, default=2, help="micro-batch per rank of the model-state runs")
    p.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=None,
        help="global batch sizes of the loss benchmark (default 4096 8192 16384; --quick 1024 2048 4096)",
    )
    p.add_argument("--md", type=Path, default=None, help="also write the results to this markdown file")
    # worker mode (this file run by `run_workers`)
    p.add_argument("--worker", choices=("zero", "loss"), help=argparse.SUPPRESS)
    p.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    p.add_argument("--persistence-threshold", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--json-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        out = (zero_worker if args.worker == "zero" else loss_worker)(args)
        Path(args.json_dir, f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(out))
        return

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the estimators import deepspeed here too
    start = time.time()
    preset = args.preset or ("tiny" if args.quick else "ViT-B-32")
    sizes = args.sizes or ([1024, 2048, 4096] if args.quick else [4096, 8192, 16384])
    # tiny's matrices are all below ZeRO-3's default persistence threshold (1e5 elements): they would stay
    # replicated, which ViT-B-32's are not (there only biases / norms / embeddings under 1e5, ~0.1 % of P, do).
    threshold = 0 if preset == "tiny" else None
    zero = {}
    for stage in (1, 2, 3):
        for world in (1, 2):
            print(f"[memory] ZeRO-{stage}, {world} rank(s), {preset}", flush=True)
            zero[(stage, world)] = measure_zero(
                stage, world, preset=preset, batch=args.batch, persistence_threshold=threshold
            )
    print(f"[memory] loss at B = {sizes} on 2 ranks, {sizes[:-1]} on 1 rank", flush=True)
    # 1 rank holds the whole [B, B] problem (b = B): the same constant, 2x the bytes; the largest B is left out
    # there (about 9 GiB at B = 16384)
    loss = {2: measure_loss(sizes, 2), **({1: measure_loss(sizes[:-1], 1)} if len(sizes) > 1 else {})}

    P = zero[(1, 1)][0]["total_params"]
    report = [
        f"## Per-rank model states: {preset}, fp32, AdamW, micro-batch {args.batch} per rank "
        f"(P = {P / 1e6:.2f} M parameters; MiB per rank)",
        *(["(tiny: stage3_param_persistence_threshold = 0, see the script's comment)"] if threshold == 0 else []),
        "",
        *zero_table(zero),
        "",
        *NOTES_ZERO,
        "",
        f"## Loss peak memory per rank: NeuCLIPLoss through gather_features, d = {EMBED_DIM}, fp32",
        "",
        *loss_table(loss),
        "",
        *NOTES_LOSS,
        "",
        f"wall time {time.time() - start:.0f} s",
    ]
    text = "\n".join(report)
    print(text)
    if args.md:
        cmd = "python benchmarks/memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(f"# Memory (issue 8.3)\n\nCommand: `{cmd.strip()}`\n\n{text}\n")


if __name__ == "__main__":
    main()
