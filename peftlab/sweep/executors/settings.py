"""Which executor runs a sweep's cells (built by :func:`peftlab.sweep.executors.build_executor`), from the experiment's ``[executor]`` table and the
command line (flags win):

```toml
[executor]
kind = "slurm"          # local (default) | ray | slurm
partition = "gpu"       # slurm
time_min = 120          # slurm: the time limit of each cell's job
gpus_per_cell = 1       # ray, slurm (default: 1 when the model's device is CUDA, else 0)
cpus_per_cell = 8       # ray, slurm (default: 1 with a GPU, else this machine's cores)
mem_gb = 64             # slurm
ray_address = "auto"    # ray: join this cluster (default: start a local instance)
jobs = 2                # local: cells at once on this machine
```
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from peftlab.plugin.errors import ValidationError

KINDS = ("local", "ray", "slurm")
ONLY_FOR = {"jobs": "local", "ray_address": "ray", "partition": "slurm", "time_min": "slurm", "mem_gb": "slurm",
            "cluster": "slurm"}


@dataclass
class ExecutorSettings:
    kind: str = "local"  # local | ray | slurm
    jobs: int = 1  # local: cells at once on this machine (one GPU each, or a share of the cores)
    ray_address: str | None = None  # ray: join this cluster (None: start a local instance for the sweep)
    partition: str | None = None  # slurm: the partition each cell's job goes to
    time_min: int = 60  # slurm: the time limit of each cell's job, minutes
    cpus_per_cell: int | None = None  # ray, slurm (None: 1 with a GPU, else this machine's cores)
    gpus_per_cell: int | None = None  # ray, slurm (None: 1 when the model's device is CUDA, else 0)
    mem_gb: int | None = None  # slurm: memory per job (None: the partition's default)
    cluster: str = "slurm"  # "local": submitit's local executor (tests)

    @classmethod
    def from_sources(cls, table: dict[str, Any] | None, flags: dict[str, Any] | None = None) -> ExecutorSettings:
        """The experiment's ``[executor]`` table, then the flags that were given (not None)."""
        allowed = [f.name for f in fields(cls)]
        merged: dict[str, Any] = {}
        named: dict[str, str] = {}  # how the error names each key: executor.jobs, or --jobs
        for flag, source in ((False, table or {}), (True, {k: v for k, v in (flags or {}).items() if v is not None})):
            for key, value in source.items():
                named[key] = "--" + ("executor" if key == "kind" else key.replace("_", "-")) if flag else f"executor.{key}"
                if key not in allowed:
                    raise ValidationError(named[key], value, f"a key among {', '.join(allowed)}")
                merged[key] = value
        settings = cls(**merged)
        if settings.kind not in KINDS:
            raise ValidationError(named["kind"], settings.kind, f"one of {', '.join(KINDS)}")
        for key, kind in ONLY_FOR.items():
            if key in merged and merged[key] != getattr(cls, key) and settings.kind != kind:
                raise ValidationError(named[key], merged[key], f"unset with executor {settings.kind!r} "
                                      f"(it applies to the {kind} executor)")
        return settings
