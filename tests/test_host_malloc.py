"""--host-malloc (neuclip_ds/host_malloc.py): with glibc's settings tuned, a training loop on the CPU stops paying
page faults for memory it frees and takes back every step; the user's own allocator choice is left alone."""

import platform
import shutil
import subprocess
import sys

import pytest

from neuclip_ds.host_malloc import APPLIED, as_environment, tune_host_malloc, user_choice

# A small MLP trained for 14 steps in a fresh interpreter (malloc's state is per process); prints the minor page
# faults of each step. Its activations (256 x 2048 fp32, 2 MiB each) are the size a CPU training step frees and
# allocates again; the 48 MiB flat copy of its gradients stands for ZeRO's (one block of the model's size, past the
# 32 MiB up to which an mmap threshold can keep blocks in the heap).
STEPS = """
import resource, sys, torch
from neuclip_ds.host_malloc import tune_host_malloc
print(tune_host_malloc(sys.argv[1], on_cpu=True))
torch.manual_seed(0)
layers = []
for _ in range(4):
    layers += [torch.nn.Linear(512, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 512)]
model = torch.nn.Sequential(*layers)
opt = torch.optim.AdamW(model.parameters())
x = torch.randn(256, 512)
for step in range(14):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model(x).square().mean().backward()
    flat = torch.cat([p.grad.flatten() for p in model.parameters()] + [torch.zeros(4 * 2**20)])
    opt.step()
    opt.zero_grad()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults_per_step(mode: str, extra_env: dict[str, str] | None = None) -> tuple[str, list[int]]:
    """What tune_host_malloc(mode) said, and the page faults of each step. Address-space randomization off (where
    setarch exists): where the kernel places the heap and the mmap'ed blocks decides how many of them glibc's
    defaults free and map again, so that with it the same program's faults vary between runs."""
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0", **(extra_env or {})}
    fixed_layout = ["setarch", "-R"] if shutil.which("setarch") else []
    out = subprocess.run(
        [*fixed_layout, sys.executable, "-c", STEPS, mode],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env=env,
    ).stdout.splitlines()
    return out[0], [int(n) for n in out[1:]]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")
def test_tuned_malloc_removes_the_page_faults_of_later_steps():
    said_glibc, default = faults_per_step("glibc")
    said_tuned, tuned = faults_per_step("tuned")
    assert said_glibc == "glibc's defaults (--host-malloc glibc)" and said_tuned == APPLIED
    assert_kept_for_the_next_step(tuned, default)


COPY_PAGES = 12_288  # 4 KiB pages of the 48 MiB flat copy


def assert_kept_for_the_next_step(tuned: list[int], default: list[int] | None = None) -> None:
    """Steps 7-14 (the first steps grow the heap and create AdamW's moments): glibc's defaults fault the flat copy
    in again on every step; the tuned heap may still grow once while it settles (a copy's worth of new pages where
    no freed block fits), and then takes none."""
    if default is not None:
        assert sum(default[6:]) > 8 * COPY_PAGES, default
    assert sum(tuned[6:]) < 1.5 * COPY_PAGES, (tuned, default)
    assert sum(tuned[10:]) < COPY_PAGES / 10, (tuned, default)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")
def test_the_settings_as_environment_variables_do_the_same():
    """What benchmarks/vs_openclip.py gives open_clip_train: the same settings through glibc's variables, read by a
    program that calls no mallopt (tune_host_malloc then leaves them as found)."""
    said, faults = faults_per_step("tuned", as_environment())
    assert said == "as found (MALLOC_MMAP_MAX_ is set)"
    assert_kept_for_the_next_step(faults)


@pytest.mark.parametrize(
    "env, chosen",
    [
        ({}, None),
        ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, "LD_PRELOAD /usr/lib/libjemalloc.so.2"),
        ({"LD_PRELOAD": "libfoo.so:libtcmalloc_minimal.so.4"}, "LD_PRELOAD libtcmalloc_minimal.so.4"),
        ({"LD_PRELOAD": "libasan.so"}, None),  # not an allocator
        ({"MALLOC_TRIM_THRESHOLD_": "131072"}, "MALLOC_TRIM_THRESHOLD_ is set"),
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "GLIBC_TUNABLES sets glibc.malloc"),
        ({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=2048"}, None),
    ],
)
def test_the_users_allocator_choice_is_detected(env, chosen):
    assert user_choice(env) == chosen


def test_left_as_found_on_a_gpu_and_where_the_user_chose(monkeypatch):
    assert tune_host_malloc("tuned", on_cpu=False) == "as found (GPU run: activations are in device memory)"
    monkeypatch.setenv("MALLOC_TOP_PAD_", "0")
    assert tune_host_malloc("tuned", on_cpu=True) == "as found (MALLOC_TOP_PAD_ is set)"
    assert tune_host_malloc("glibc", on_cpu=True) == "glibc's defaults (--host-malloc glibc)"
