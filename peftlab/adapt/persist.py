"""Adapters that outlive the run: save what trained, load it back onto a fresh base, merge.

A saved adapter is a folder. An adapter whose method peft also implements (``Adapter.peft_type``)
is written in peft's layout, so ``peft.PeftModel.from_pretrained(base, folder)`` loads it:
``adapter_config.json`` plus ``adapter_model.safetensors`` with peft's key names
(``base_model.model.<module>.lora_A.weight``). Every other adapter is written in peftlab's own:
the same safetensors file, keys as the model names its parameters. Both carry
``peftlab_adapter.json`` (the adapter's registered name and settings, the base model), which peft
ignores. :func:`load_adapter` reads either layout, and adapters peft saved (no
``peftlab_adapter.json``): the adapter plugin that declares that ``peft_type`` rebuilds it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.adapt.attach import attach
from peftlab.plugin.adapter import Adapter, AttachReport
from peftlab.plugin.errors import ValidationError

WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
OURS = "peftlab_adapter.json"
PEFT_PREFIX = "base_model.model."


def save_adapter(model: nn.Module, adapter: Adapter, targets: list[str], folder: str | os.PathLike,
                 base_model: str | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write ``adapter``'s trained state in ``model`` to ``folder`` (replaced whole, atomically)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    state = {k: v.detach().to("cpu").contiguous() for k, v in adapter.state_dict(model).items()}
    if not state:
        raise ValidationError("adapter", adapter.family, "an adapter with trained parameters to save")
    peft = adapter.peft_type is not None
    meta = {"format": "peftlab-adapter", "version": 1, "adapter": adapter.name, "settings": adapter.saved_settings(),
            "layout": "peft" if peft else "peftlab", "base_model": base_model, **(extra or {})}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        if peft:
            config = {**adapter.peft_config(model, targets), "base_model_name_or_path": base_model}
            (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
            state = {adapter.peft_key_prefix + k: v for k, v in state.items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / OURS).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


def read_adapter_info(folder: str | os.PathLike) -> dict[str, Any]:
    """What a saved adapter folder says of itself: peftlab's description, else peft's config."""
    folder = Path(folder)
    if not (folder / WEIGHTS).is_file():
        found = ", ".join(sorted(p.name for p in folder.iterdir())) if folder.is_dir() else "nothing"
        raise ValidationError("adapter folder", str(folder), f"a saved adapter with {WEIGHTS} (found: {found})")
    if (folder / OURS).is_file():
        return json.loads((folder / OURS).read_text())
    if (folder / PEFT_CONFIG).is_file():
        return {"layout": "peft", "peft": json.loads((folder / PEFT_CONFIG).read_text())}
    raise ValidationError("adapter folder", str(folder), f"a folder with {OURS} or peft's {PEFT_CONFIG}")


def load_adapter(model: nn.Module, folder: str | os.PathLike, host) -> tuple[Adapter, AttachReport]:
    """Attach the adapter saved in ``folder`` to ``model`` (a fresh base) with its trained weights."""
    from safetensors.torch import load_file

    info = read_adapter_info(folder)
    if "peft" in info:
        peft_type = info["peft"].get("peft_type")
        makers = {spec.name: spec for spec in host.adapters
                  if getattr(spec.factory, "peft_type", None) == peft_type}
        if not makers:
            raise ValidationError("adapter_config.peft_type", peft_type, "a method an installed adapter plugin "
                                  "loads from peft (none declares it)")
        refusals = []
        for name, spec in makers.items():  # the first that can represent it (peft's LORA is LoRA or DoRA)
            try:
                settings = spec.factory.settings_from_peft(info["peft"], model)
                break
            except ValidationError as exc:
                refusals.append((name, exc))
        else:
            if len(refusals) == 1:
                raise refusals[0][1]
            raise ValidationError("adapter_config.peft_type", peft_type, "settings one of the adapters that load it "
                                  "can represent; " + "; ".join(f"{n}: {e}" for n, e in refusals))
    else:
        name, settings = info["adapter"], info["settings"]
    adapter = host.adapters.build(name, **settings)
    report = attach(model, adapter)
    state = load_file(str(Path(folder) / WEIGHTS))
    if info.get("layout") == "peft":
        state = {k.removeprefix(adapter.peft_key_prefix): v for k, v in state.items()}
    adapter.load_state_dict(model, state)
    return adapter, report


def merge_into(model: nn.Module, adapter: Adapter, tokenizer, folder: str | os.PathLike) -> Path:
    """Save ``model`` with the adapter merged into its weights, in ``save_pretrained`` layout."""
    merged = adapter.merge_and_unload(model)
    for p in merged.parameters():
        p.requires_grad_(False)
    folder = Path(folder)
    merged.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)
