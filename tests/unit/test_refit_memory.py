"""A refit whose memory cannot be allocated fails saying which copy of the weights did not fit; the live weights keep
serving and the next version that fits goes live. On the CPU the allocation is refused for real: the process lowers
its own address-space limit (setrlimit RLIMIT_AS), in a child process so that nothing else runs under the limit.
(The GPU case, a ballast tensor filling the device: tests/gpu/test_refit_memory_cuda.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from serving.errors import OutOfMemoryError, is_out_of_memory
from serving.refit.memory import allocating, size_text

CHILD = r'''
import dataclasses, json, resource, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from serving.engines import build_engine
from serving.examples import TRANSFORMER, example_build_spec
from serving.factory import build_module
from serving.refit import RefitCoordinator
from serving.refit.memory import weights_nbytes
from serving.weights.random_state import random_state_dict
from serving.weights.writer import write_safetensors

folder = Path(sys.argv[1])
spec = dataclasses.replace(example_build_spec(TRANSFORMER), factory_kwargs=(("d_model", 512), ("vocab", 20000)))
# the host path, which stages the new weights in host memory before the standby copy takes them (the CPU default,
# the fast path, reads a file straight into the standby slot's own tensors: nothing to allocate per refit)
coord = RefitCoordinator(build_engine("eager", spec), strategy="double_buffer", fast_path=False)
module = build_module(TRANSFORMER, dict(spec.factory_kwargs))
for seed in (1, 2, 3):
    write_safetensors(random_state_dict(module, seed), folder / f"v{seed}.safetensors")
del module
x = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
assert coord.refit_from_path(folder / "v1.safetensors").ok
before = coord.infer([x])[0]
copy = weights_nbytes(coord.engine.weight_specs())


def address_space() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


result = {"copy": copy}
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
for margin in (0.5, 1.5):  # room for half a copy: the read fails; for one and a half: the standby copy fails
    resource.setrlimit(resource.RLIMIT_AS, (address_space() + int(margin * copy), hard))
    try:
        report = coord.refit_from_path(folder / "v2.safetensors")
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    result[str(margin)] = {"outcome": report.outcome, "reason": report.reason, "message": report.message,
                           "live": coord.live_version, "unchanged": torch.equal(coord.infer([x])[0], before)}
report = coord.refit_from_path(folder / "v3.safetensors")
result["after"] = {"outcome": report.outcome, "live": coord.live_version}
print(json.dumps(result))
'''


def test_a_refit_the_host_cannot_allocate_fails_naming_the_copy_and_the_next_one_goes_live(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    gb = f"({size_text(result['copy'])})"
    read, standby = result["0.5"], result["1.5"]
    for failed in (read, standby):
        assert failed["outcome"] == "failed" and failed["reason"] == "out_of_memory", failed
        assert failed["live"] == "v1" and failed["unchanged"], failed
        assert "can't allocate memory" in failed["message"] and "the live weights keep serving" in failed["message"]
    assert read["message"].startswith(f"OutOfMemoryError: host: out of memory allocating the new weights in host "
                                      f"memory {gb}"), read["message"]
    assert standby["message"].startswith(f"OutOfMemoryError: cpu: out of memory allocating the standby copy of the "
                                         f"weights {gb}"), standby["message"]
    assert "set refit_strategy=in_place (one copy of the weights instead of two)" in standby["message"]
    assert result["after"] == {"outcome": "success", "live": "v3"}


def test_allocating_names_what_did_not_fit_and_lets_other_errors_through() -> None:
    with pytest.raises(OutOfMemoryError, match=r"^cuda:0: out of memory allocating the standby copy \(2.00 GB\): "
                                               r"CUDA out of memory. Tried to allocate 2.00 GiB; the live weights keep "
                                               r"serving. Free memory there$") as e, \
            allocating("the standby copy", "cuda:0", 2_000_000_000, "Free memory there"):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
    assert e.value.reason == "out_of_memory"
    with pytest.raises(ValueError), allocating("x", "cpu", 1, "fix"):
        raise ValueError("not an allocation")
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
