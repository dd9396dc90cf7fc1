"""The scale plan for H100 80GB users: parameters, ZeRO model states, activation memory and the largest batch.

    python benchmarks/scale_plan.py                                        # ViT-B-32, ViT-B-16, ViT-L-14, ViT-H-14
    python benchmarks/scale_plan.py --quick                                # ViT-B-32 and ViT-L-14 only
    python benchmarks/scale_plan.py --out benchmarks/results/scale_plan.md

Nothing is hard-coded: parameter counts come from the preset configs (models built on the meta device),
model-state memory from DeepSpeed's own estimators, activation / loss / NPN memory from measurements on CPU in
bf16 (a forward and backward at batch 1, 2 and 4, counting the bytes of the storages the ops create). No GPU is
used: every figure is computed, none is measured on an H100.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # importing deepspeed on a CPU-only machine

from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from neuclip_ds.config import TrainConfig, parse_config
from neuclip_ds.losses import NeuCLIPLoss, gather_features
from neuclip_ds.model import build_model
from neuclip_ds.npn import NPN
from neuclip_ds.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-H-14")
QUICK_PRESETS = ("ViT-B-32", "ViT-L-14")
BATCHES = (1, 2, 4)  # per-sample = slope over these; batch 2 checks linearity
LAYOUTS = {"8 GPUs": (8, 1), "64 GPUs": (8, 8)}  # (GPUs per node, nodes)
PLAN_GPUS = 8  # the batch columns are for one node of 8 GPUs
LAUNCH = {"ViT-L-14": "ds_configs/vit_l14_8xh100.json", "ViT-H-14": "ds_configs/vit_h14_8xh100.json"}
GiB, MiB = 2**30, 2**20


# -------------------------------------------------------------------------------------------------------------
# 1. parameters
# -------------------------------------------------------------------------------------------------------------
def count_params(preset: str) -> dict:
    """Vision / text / total parameters and the largest layer, from a model built on the meta device.

    The largest layer is counted as DeepSpeed's stage3.model_to_params does (parameters of one module, not
    recursive); its *_all_live estimators also dedupe by data_ptr, which is 0 for every meta tensor, hence this."""
    with torch.device("meta"):
        model = build_model(preset)
    numel = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return {"vision": numel(model.visual), "text": numel(model.text), "total": numel(model), "largest": largest}


# -------------------------------------------------------------------------------------------------------------
# 2. model states (DeepSpeed's estimators)
# -------------------------------------------------------------------------------------------------------------
def model_states_bytes(stage: int, total: int, largest: int, gpus_per_node: int, nodes: int) -> int:
    """Per-GPU params + grads + Adam states (bf16/fp16 mixed precision), no offload, as DeepSpeed estimates them.

    These are the functions behind the non-offload rows that estimate_zero{2,3}_model_states_mem_needs_all_cold
    print (those only print, they return None)."""
    if stage == 2:
        return estimate_zero2_model_states_mem_needs(total, gpus_per_node, nodes, cpu_offload=False)[1]
    if stage == 3:
        return estimate_zero3_model_states_mem_needs(
            total, largest, gpus_per_node, nodes, cpu_offload=False, cpu_offload_params=False
        )[1]
    raise ValueError(f"stage: 2 or 3, got {stage}")


# -------------------------------------------------------------------------------------------------------------
# 3. measured memory
# -------------------------------------------------------------------------------------------------------------
class MemoryProbe(TorchDispatchMode):
    """Counts the storages created by the ops run inside it: bytes alive now (`live_bytes`), the peak, and the
    bytes autograd saves for backward (`pack`, for torch.autograd.graph.saved_tensors_hooks).

    A storage counts once however many views share it (keyed by untyped_storage().data_ptr()). Storages that
    existed before (parameters, the input batch) are never counted: an op output aliasing an input storage we did
    not see created is skipped. Liveness is checked with storage weak references, so tensors kept by the autograd
    graph, or by a checkpoint's closure, count as long as they really stay in memory. `exclude(t)` removes a
    storage from the peak afterwards (parameter gradients: model states, not activations); hence the peak is
    computed at the end from the list of allocation / free events."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int, int]] = {}  # data_ptr -> (weak ref, bytes, event id)
        self.events: list[tuple[int, int]] = []  # (event id, +bytes | -bytes)
        self.excluded: set[int] = set()
        self.saved: dict[int, int] = {}
        self.marks: dict[str, tuple[int, int]] = {}

    def _sweep(self) -> None:
        for ptr, (ref, nbytes, eid) in list(self.live.items()):
            if ref.expired():
                del self.live[ptr]
                self.events.append((eid, -nbytes))

    def live_bytes(self) -> int:
        self._sweep()
        return sum(n for _, n, eid in self.live.values() if eid not in self.excluded)

    @property
    def peak(self) -> int:
        current = peak = 0
        for eid, delta in self.events:
            if eid not in self.excluded:
                current += delta
                peak = max(peak, current)
        return peak

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        self._sweep()
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                ptr = s.data_ptr()
                if ptr and ptr not in self.live and ptr not in inputs:
                    self.live[ptr] = (StorageWeakRef(s), s.nbytes(), len(self.events))
                    self.events.append((len(self.events), s.nbytes()))
        return out

    def exclude(self, t: torch.Tensor) -> None:
        entry = self.live.get(t.untyped_storage().data_ptr())
        if entry is not None:
            self.excluded.add(entry[2])

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr in self.live:  # parameters and inputs are saved too; they are not activations
            self.saved[ptr] = self.live[ptr][1]
        return t

    def mark(self, name: str) -> None:
        self.marks[name] = (self.live_bytes(), sum(self.saved.values()))


def measure_towers(model, preset: str, batch: int, checkpointing: bool) -> dict:
    """One training forward + backward of both towers at `batch` (bf16 model and inputs); bytes:
    saved_* (by autograd during each tower's forward), held_* (alive after each tower's forward),
    peak (max alive over forward and backward, checkpoint recomputation included).

    Parameter gradients are model states (ZeRO reduces them into its buckets): each is dropped when accumulated
    and left out of the peak. The stand-in loss (img * txt).sum() costs nothing; the contrastive loss is measured
    apart."""
    p = get_preset(preset)
    model.set_grad_checkpointing(checkpointing)
    model.train()  # HF checkpoints only in train mode
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, p.image_size, p.image_size, generator=gen).to(torch.bfloat16)
    ids = torch.randint(0, p.vocab_size, (batch, p.context_length), generator=gen)
    probe = MemoryProbe()

    def drop(q):
        probe.exclude(q.grad)
        q.grad = None

    handles = [q.register_post_accumulate_grad_hook(drop) for q in model.parameters()]
    try:
        with probe:
            with torch.autograd.graph.saved_tensors_hooks(probe.pack, lambda t: t):
                img = model.encode_image(x)
                probe.mark("vision")
                txt = model.encode_text(ids)
                probe.mark("text")
            (img.float() * txt.float()).sum().backward()
    finally:
        for h in handles:
            h.remove()
    (held_v, saved_v), (held_vt, saved_vt) = probe.marks["vision"], probe.marks["text"]
    return {
        "saved_vision": saved_v,
        "saved_text": saved_vt - saved_v,
        "held_vision": held_v,
        "held_text": held_vt - held_v,
        "peak": probe.peak,
    }


def measure_activations(preset: str, batches=BATCHES) -> dict:
    """Per-sample bytes (slope between the smallest and largest batch), the fixed part (intercept) and the
    largest relative deviation of a batch's bytes from that line, for each quantity of measure_towers, without
    and with activation checkpointing."""
    torch.manual_seed(0)
    model = build_model(preset).to(torch.bfloat16)
    result = {}
    for ckpt in (False, True):
        runs = {b: measure_towers(model, preset, b, ckpt) for b in batches}
        lo, hi = batches[0], batches[-1]
        for key in runs[lo]:
            slope = (runs[hi][key] - runs[lo][key]) / (hi - lo)
            fixed = runs[lo][key] - slope * lo
            dev = max(abs(runs[b][key] - (fixed + slope * b)) / max(runs[b][key], 1) for b in batches)
            result[(key, ckpt)] = {"per_sample": slope, "fixed": fixed, "nonlinearity": dev}
    return result


def measure_loss_factor(n: int = 2048, dim: int = 8) -> float:
    """Peak bytes of the NeuCLIP loss forward + backward (fp32 features, as the engine computes it) in units of
    one fp32 [b_local x B_global] matrix. Measured at b = B = n on one process; dim is small so the [n, dim]
    feature terms are negligible next to the n x n ones."""
    cfg = TrainConfig()
    gen = torch.Generator().manual_seed(0)
    img, txt = (
        torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=-1).requires_grad_() for _ in range(2)
    )
    tau, alpha = torch.full([1], cfg.init_tau, requires_grad=True), torch.zeros(n)
    probe = MemoryProbe()
    with probe:
        NeuCLIPLoss(cfg.normalizer_eps, cfg.rho)(gather_features(img, txt), tau, alpha, alpha).backward()
    return probe.peak / (4 * n * n)


def measure_npn_factor(n: int = 2048, prototypes: int = 1024, dim: int = 8) -> float:
    """Peak bytes of one NPN inner step (forward, backward, AdaGrad) on a global batch of n, in units of one fp32
    [B_global x m] matrix (m = prototypes); the NPN runs on the whole gathered batch on every rank."""
    cfg = TrainConfig()
    gen = torch.Generator().manual_seed(0)
    img, txt = (torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=-1) for _ in range(2))
    npn = NPN(dim, num_prototypes=prototypes, eps=cfg.normalizer_eps, lr=cfg.npn_lr)
    target = torch.zeros(n)
    probe = MemoryProbe()
    with probe:
        npn.fit(img, txt, target, target, torch.full([1], cfg.init_tau), steps=1)
    return probe.peak / (4 * n * prototypes)


# -------------------------------------------------------------------------------------------------------------
# 4. the largest per-GPU batch
# -------------------------------------------------------------------------------------------------------------
def max_batch(
    budget: float,
    states: float,
    act_fixed: float,
    act_per_sample: float,
    loss_factor: float,
    npn_factor: float,
    prototypes: int,
    gpus: int,
) -> int:
    """Largest b with states + activations(b) + max(loss(b, B), NPN(B)) <= budget, B = b * gpus.

    The loss and the NPN inner loop run one after the other, both while the towers' activations are held."""

    def need(b: int) -> float:
        B = b * gpus
        return states + act_fixed + b * act_per_sample + 4 * max(loss_factor * b * B, npn_factor * B * prototypes)

    b = 0
    while need(b + 1) <= budget:
        b += 1
    return b


# -------------------------------------------------------------------------------------------------------------
# report
# -------------------------------------------------------------------------------------------------------------
def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def launch_command(preset: str, ds_config: str, per_gpu: int, ckpt: bool, prototypes: int) -> str:
    flags = [
        *f"--preset {preset} --loss neuclip".split(),
        *'--train-data "$SHARDS" --train-num-samples "$NUM_SAMPLES" --tokenizer "$TOKENIZER"'.split(),
        *f"--epochs 32 --global-batch-size {per_gpu * PLAN_GPUS} --precision bf16".split(),
        *(["--grad-checkpointing"] if ckpt else []),
        *f"--npn-prototypes {prototypes} --ds-config {ds_config} --workers 8 --save-every 2000".split(),
        *f"--output-dir runs/{preset.lower()}-8xh100".split(),
    ]
    # the same flags, with synthetic data in place of the shards, must pass neuclip_ds' own validation
    data = {"--train-data", "--train-num-samples", "--tokenizer"}
    check = [f for i, f in enumerate(flags) if f not in data and (i == 0 or flags[i - 1] not in data)]
    parse_config([*check, "--synthetic-samples", "1000"]).validate(world_size=PLAN_GPUS)
    return f"launchers/single_node.sh {PLAN_GPUS} " + " ".join(flags)


def suggested_batch(b_max: int) -> int:
    """The largest power of two not above b_max: round, and headroom for what a CPU measurement cannot see."""
    return 1 << (b_max.bit_length() - 1) if b_max else 0


def plan(presets, *, gpu_gib: float, usable: float, workspace_gib: float, prototypes: int) -> str:
    budget = gpu_gib * GiB * usable - workspace_gib * GiB
    t0 = time.time()
    loss_factor, npn_factor = measure_loss_factor(), measure_npn_factor()
    rows_p, rows_a, rows_b, chosen, states_of = [], [], [], {}, {}
    checks = {"held": 0.0, "fixed": 0.0, "lin": 0.0}
    for name in presets:
        print(f"[scale_plan] {name}: measuring ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
        pc = count_params(name)
        act = measure_activations(name)
        states = {
            (st, lay): model_states_bytes(st, pc["total"], pc["largest"], *LAYOUTS[lay])
            for st in (2, 3)
            for lay in LAYOUTS
        }
        states_of[name] = states
        rows_p.append(
            [
                name,
                *(f"{pc[k] / 1e6:.2f}" for k in ("vision", "text", "total", "largest")),
                *(f"{v / GiB:.2f}" for v in states.values()),
            ]
        )
        per = lambda key, ck, act=act: act[(key, ck)]["per_sample"]  # noqa: E731
        rows_a.append(
            [name, *(f"{per(k, ck) / MiB:.1f}" for ck in (False, True) for k in ("saved_vision", "saved_text", "peak"))]
        )
        for ck in (False, True):  # the cross-checks reported under the table
            saved = per("saved_vision", ck) + per("saved_text", ck)
            held = per("held_vision", ck) + per("held_text", ck)
            checks["held"] = max(checks["held"], abs(held - saved) / held)
            checks["fixed"] = max(checks["fixed"], abs(act[("peak", ck)]["fixed"]))
            checks["lin"] = max(checks["lin"], act[("peak", ck)]["nonlinearity"])
        cells = []
        for st in (2, 3):
            for ck in (False, True):
                peak = act[("peak", ck)]
                b = max_batch(
                    budget,
                    states[(st, "8 GPUs")],
                    peak["fixed"],
                    peak["per_sample"],
                    loss_factor,
                    npn_factor,
                    prototypes,
                    PLAN_GPUS,
                )
                chosen[(name, st, ck)] = b
                cells.append(f"{b} ({b * PLAN_GPUS})")
        rows_b.append([name, *cells])
    sizes = lambda attr: "/".join(sorted({str(getattr(get_preset(n), attr)) for n in presets}))  # noqa: E731

    out = [
        f"# Scale plan: CLIP presets on H100 80GB (computed on CPU, {time.strftime('%Y-%m-%d')})",
        "",
        "No GPU was available: every number below is computed (DeepSpeed's estimators, memory measured on CPU "
        "in bf16), none was measured on an H100.",
        "",
        "## 1. Parameters and model states per GPU",
        "",
        table(
            [
                "preset",
                "vision (M)",
                "text (M)",
                "total (M)",
                "largest layer (M)",
                *(f"ZeRO-{st}, {lay} (GB)" for st, lay in states),
            ],
            rows_p,
        ),
        "",
        "Parameters: the preset's HF configs built on the meta device (total includes tau). Model states = bf16 "
        "params + grads + fp32 master params + Adam moments per GPU, no offload, from DeepSpeed's "
        "`estimate_zero2_model_states_mem_needs` (2P + 18P/N bytes) and `estimate_zero3_model_states_mem_needs` "
        "(4L + 18P/N bytes, L = largest layer), i.e. the non-offload rows that "
        "`estimate_zero{2,3}_model_states_mem_needs_all_cold` print. 8 GPUs = 1 node x 8, 64 GPUs = 8 nodes x 8. "
        "GB = 2^30 bytes, MB = 2^20 bytes throughout.",
        "",
        "## 2. Activation memory (bf16, MB per sample)",
        "",
        table(
            ["preset", "vision saved", "text saved", "peak", "vision saved, ckpt", "text saved, ckpt", "peak, ckpt"],
            rows_a,
        ),
        "",
        f"Measured on CPU: one training forward + backward of both towers of the bf16 model at batch "
        f"{', '.join(map(str, BATCHES))} ({sizes('image_size')} px images, {sizes('context_length')} text "
        f"tokens; HF `sdpa` attention, which runs the CPU flash kernel: no [seq x seq] attention matrix is kept, "
        f"as with flash / memory-efficient attention on H100). Counted: the bytes of the storages the ops "
        f"create, once per storage (views deduplicated by `untyped_storage().data_ptr()`); never parameters, "
        f"parameter gradients (model states: each is dropped when accumulated and left out) or the input batch. "
        f"*saved* = what autograd saves for backward during each tower's forward "
        f"(`torch.autograd.graph.saved_tensors_hooks`; with checkpointing: the checkpointed layers' inputs and "
        f"what lies outside them). Cross-check: the storages still alive after each forward (storage weak "
        f"references) equal the saved bytes within {100 * checks['held']:.1f} %. *peak* = most bytes alive at "
        f"once over forward and backward, checkpoint recomputation of one layer and activation gradients "
        f"included: the figure the batch plan uses. Per sample = slope between batch {BATCHES[0]} and "
        f"{BATCHES[-1]}; intercepts (batch-independent bytes) <= {checks['fixed'] / MiB:.2f} MB, largest "
        f"deviation from the line {100 * checks['lin']:.2f} %. Every preset was measured whole (no per-layer "
        f"extrapolation).",
        "",
        f"## 3. Largest per-GPU batch on {PLAN_GPUS} x H100 80GB (global batch in brackets)",
        "",
        table(["preset", "ZeRO-2", "ZeRO-2 + ckpt", "ZeRO-3", "ZeRO-3 + ckpt"], rows_b),
        "",
        f"Largest b with model states (8 GPUs) + b x peak per sample + max(contrastive loss, NPN) <= "
        f"{gpu_gib:g} GB x {usable:g} usable - {workspace_gib:g} GB workspace (CUDA context, cuBLAS/NCCL "
        f"buffers, ZeRO buckets and ZeRO-3 prefetch; the other {1 - usable:.0%} is left to allocator "
        f"fragmentation). Contrastive loss (NeuCLIP, fp32 features, b local anchors against the global batch "
        f"B = b x {PLAN_GPUS}): the peak of its forward + backward, measured = {loss_factor:.2f} fp32 [b x B] "
        f"matrices (two similarity matrices, their shifted/scaled copies, the int64 one-hot diagonal mask, "
        f"logsumexp inputs and the gradients). NPN inner step on the gathered batch: measured = "
        f"{npn_factor:.2f} fp32 [B x m] matrices, m = --npn-prototypes = {prototypes}. The loss and the NPN "
        f"are not alive together; the larger is added to the towers' peak (conservative: the towers' peak "
        f"comes in their backward, after the loss's own backward).",
        "",
    ]

    launch = [name for name in presets if name in LAUNCH]
    if launch:
        out += [
            f"## 4. Launch commands ({PLAN_GPUS} x H100; computed, not measured)",
            "",
            "Set SHARDS (webdataset shards, e.g. '/data/laion/{00000..41407}.tar'), NUM_SAMPLES (samples per "
            "epoch) and TOKENIZER (a local HF tokenizer directory). Per-GPU batch = the table's largest for "
            "the config's ZeRO stage with checkpointing (a larger global batch gives the contrastive loss more "
            "negatives, for about a third more compute per sample), rounded down to a power of two: headroom "
            "for what the CPU measurement cannot see (cuBLAS / attention-kernel workspaces, NCCL buffers of the "
            "feature gathers, fragmentation beyond the 10 %). The "
            "same flags with synthetic data in place of the shards pass `neuclip_ds.config` validation at "
            f"{PLAN_GPUS} ranks.",
            "",
        ]
        for name in launch:
            ds = LAUNCH[name]
            stage = json.loads((ROOT / ds).read_text())["zero_optimization"]["stage"]
            per_gpu = suggested_batch(chosen[(name, stage, True)])
            other = 5 - stage  # the other of ZeRO-2 / ZeRO-3
            alt = suggested_batch(chosen[(name, other, True)])
            out += [
                f"{name}: ZeRO-{stage} ({ds}), {per_gpu} per GPU = {per_gpu * PLAN_GPUS} global "
                f"(ZeRO-{other} by the same rule: {alt} per GPU)",
                "",
                "```bash",
                launch_command(name, ds, per_gpu, True, prototypes),
                "```",
                "",
            ]
            if stage == 3 and alt == per_gpu:
                extra = (states_of[name][(2, "8 GPUs")] - states_of[name][(3, "8 GPUs")]) / GiB
                out += [
                    f"For {name}, ZeRO-2 reaches the same per-GPU batch (its model states cost {extra:.2f} GB "
                    f"more per GPU) without ZeRO-3's parameter all-gathers in forward and backward (1.5x "
                    f"ZeRO-2's communication volume): {LAUNCH['ViT-L-14']} holds nothing ViT-L specific and "
                    f"can be used instead. ZeRO-3 pays off once model states matter: its states shrink as "
                    f"1/N, ZeRO-2's replicated bf16 parameters (2 bytes x P) do not.",
                    "",
                ]
    print(f"[scale_plan] done in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"only {' and '.join(QUICK_PRESETS)}")
    parser.add_argument("--presets", nargs="+", choices=PRESETS, help="presets to plan (default: all four)")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory, GB (2^30 bytes)")
    parser.add_argument("--usable", type=float, default=0.9, help="usable fraction of the GPU memory")
    parser.add_argument("--workspace-gib", type=float, default=4.0, help="fixed workspace, GB")
    parser.add_argument("--npn-prototypes", type=int, default=TrainConfig().npn_prototypes)
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    presets = args.presets or (QUICK_PRESETS if args.quick else PRESETS)
    text = plan(
        list(presets),
        gpu_gib=args.gpu_gib,
        usable=args.usable,
        workspace_gib=args.workspace_gib,
        prototypes=args.npn_prototypes,
    )
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
