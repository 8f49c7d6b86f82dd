"""When a finished record counts as done on resume: made here (this host and device, the same
torch, transformers, bitsandbytes and peftlab; any thread count). Records from elsewhere (committed
reference results in a fresh clone) run again unless the sweep is told to reuse them."""

from __future__ import annotations

import re
from typing import Any

from peftlab.sweep.experiment import Experiment

DONE = ("ok", "skipped")


#: what must match for a finished record to count as done on resume (``device`` names the CPU model
#: or GPU: machines that share a host name, as cloud VMs do, still differ there)
SAME_PLACE = ("machine.id", "device", "version.torch", "version.transformers", "version.bitsandbytes",
              "version.peftlab")


def here(exp: Experiment | None = None) -> dict[str, str]:
    """This process's values of :data:`SAME_PLACE` (the device of ``exp``'s base model)."""
    from peftlab.cell.models import ModelConfig
    from peftlab.provenance import device_name, machine_id, versions

    v = versions()
    model = ModelConfig(**(exp.base.get("model", {}) if exp else {}))
    return {"machine.id": machine_id(), "device": device_name(model.resolved_device()),
            **{k: v.get(k.removeprefix("version."), "") for k in SAME_PLACE[2:]}}


def _cores_only(device: Any) -> Any:
    """A CPU's device name without the thread count: a cell run with a share of the threads
    (``--jobs``) was still made on this machine (its threads are recorded in ``cell.threads``)."""
    return re.sub(r", \d+ threads\)$", ")", device) if isinstance(device, str) else device


def same_place(record: dict[str, Any], place: dict[str, str]) -> bool:
    return all((_cores_only(record.get(k)) if k == "device" else record.get(k)) ==
               (_cores_only(v) if k == "device" else v) for k, v in place.items())
