"""Freed memory kept for reuse: what the command line asks of glibc's malloc, and its effect.

Each check runs in a fresh interpreter: malloc settings are process-wide and lasting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from clipguard.allocator import SYSTEM_MALLOC_VARIABLE
from tests.conftest import GLIBC_ONLY, LAB_LIKE_CONFIG

#: six forward and backward passes of the image tower of the config in argv[2] (batch 720,
#: whose largest activations are tens of megabytes), printing whether the settings applied
#: and the page faults each pass took
_PASSES = """
import json, resource, sys, torch
from clipguard.allocator import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "reuse" else False
from clipguard.model import ModelBundle, build_clip_from_config
config = json.loads(sys.argv[2])
torch.manual_seed(0)
bundle = ModelBundle.from_model(build_clip_from_config(config), config)
pixels = torch.rand(720, 3, 32, 32)
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    bundle.encode_image(pixels.clone().requires_grad_(True)).sum().backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _passes(mode: str, **environment: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _PASSES, mode, json.dumps(LAB_LIKE_CONFIG)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **environment},
    )
    return json.loads(result.stdout)


@GLIBC_ONLY
def test_freed_blocks_are_reused_instead_of_mapped_and_zero_filled_again() -> None:
    system, reused = _passes("system"), _passes("reuse")
    assert reused["applied"] is True and system["applied"] is False
    # once warm (the last three passes), every pass maps its large activations afresh, and
    # the kernel zero-fills each page again, unless freed blocks are reused
    assert sum(system["faults"][3:]) > 3 * 2**14
    assert sum(reused["faults"][3:]) < sum(system["faults"][3:]) / 4


@GLIBC_ONLY
def test_the_environment_variable_leaves_malloc_alone() -> None:
    left_alone = _passes("reuse", **{SYSTEM_MALLOC_VARIABLE: "1"})
    assert left_alone["applied"] is False
    assert sum(left_alone["faults"][3:]) > 3 * 2**14


def test_the_command_line_applies_the_settings_before_torch_is_imported() -> None:
    probe = (
        "import sys, clipguard.allocator as a, clipguard._entry as e\n"
        "calls = []\n"
        "e.reuse_freed_memory = lambda: calls.append('torch' in sys.modules)\n"
        "sys.argv = ['clipguard', '--help']\n"
        "try:\n    e.main()\nexcept SystemExit:\n    pass\n"
        "print(calls, file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.stderr.strip().splitlines()[-1] == "[False]"
