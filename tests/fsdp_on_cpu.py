"""Run a further_pt script under FSDP version 2 on CPU processes (gloo), for the tests.

torch's ``fully_shard`` runs on CPU with gloo, but Accelerate 1.15 only enters FSDP
on accelerators: on a CPU process group it keeps MULTI_CPU and wraps the model in
DDP (``accelerate/state.py``: FSDP is chosen only for MULTI_GPU/XPU/... types), and
``accelerate launch --cpu --use_fsdp`` is refused. This wrapper builds every
Accelerator with an FSDP2 plugin (one shard unit per ``BertLayer`` plus the root)
and switches its state to FSDP, which is what ``accelerate launch --use_fsdp
--fsdp_version 2`` gives on GPUs; then it runs the script. Usage, under
``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2``::

    tests/fsdp_on_cpu.py further_pt/pretrain.py key=value ...

With ``FSDP_ON_CPU_LOADS=<folder>`` each process also appends the name of every file it
``torch.load``s to ``<folder>/rank-<RANK>.txt`` (which process read the optimizer state).
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = Accelerator.__init__


def _fsdp_init(self: Accelerator, *args: object, **kwargs: object) -> None:
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["BertLayer"], reshard_after_forward=True)
    _init(self, *args, fsdp_plugin=plugin, **kwargs)
    self.state.distributed_type = DistributedType.FSDP
    self.state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


Accelerator.__init__ = _fsdp_init  # type: ignore[method-assign]

_load = torch.load


def _logged_load(f: object, *args: object, **kwargs: object) -> object:
    with open(Path(os.environ["FSDP_ON_CPU_LOADS"]) / f"rank-{os.environ['RANK']}.txt",
              "a") as fh:
        fh.write(f"{Path(str(f)).name}\n")
    return _load(f, *args, **kwargs)


if os.environ.get("FSDP_ON_CPU_LOADS"):
    torch.load = _logged_load  # type: ignore[assignment]

if __name__ == "__main__":
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
