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


#: every file a saved adapter folder holds: the only files writing one may replace
ADAPTER_FILES = (WEIGHTS, PEFT_CONFIG, OURS)


def check_adapter_destination(folder: str | os.PathLike, field: str = "--save-adapter") -> Path:
    """Refuse, before any work, a destination that writing an adapter would damage: a file, a
    folder holding anything but a saved adapter's own files (they alone are replaced), or a place
    where no file can be written (tried for real)."""
    from peftlab.atomic import probe_folder

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValidationError(field, str(folder), "a folder for the adapter's files (this is a file)")
    if folder.is_dir():
        others = sorted(p.name for p in folder.iterdir() if p.name not in ADAPTER_FILES)
        if others:
            shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
            raise ValidationError(field, str(folder), f"a new or empty folder, or one holding a saved adapter alone "
                                  f"({', '.join(ADAPTER_FILES)}); it also holds {shown}, which saving would not "
                                  "keep. Nothing was written: pick another folder")
    why = probe_folder(folder.parent if not folder.is_dir() else folder)
    if why:
        raise ValidationError(field, str(folder), f"a folder where files can be written ({why})")
    return folder


_SAME = object()


def save_adapter(model: nn.Module, adapter: Adapter, targets: list[str], folder: str | os.PathLike,
                 base_model: str | None = None, extra: dict[str, Any] | None = None,
                 peft_base: Any = _SAME) -> Path:
    """Write ``adapter``'s trained state in ``model`` to ``folder``, atomically: a new folder, or
    one holding an earlier saved adapter alone (replaced whole); any other file there is refused
    (:func:`check_adapter_destination`), never deleted. ``base_model`` is peftlab's name for the
    base; ``peft_base`` what peft's config names (``base_model_name_or_path``; default the same)."""
    from safetensors.torch import save_file

    from peftlab.atomic import umask

    folder = check_adapter_destination(folder, "adapter folder")
    state = {k: v.detach().to("cpu").contiguous() for k, v in adapter.state_dict(model).items()}
    if not state:
        raise ValidationError("adapter", adapter.family, "an adapter with trained parameters to save")
    restart = adapter.saved_start()
    peft = adapter.peft_type is not None and restart is None and adapter.peft_loads(model, targets)
    meta = {"format": "peftlab-adapter", "version": 1, "adapter": adapter.name, "settings": adapter.saved_settings(),
            "layout": "peft" if peft else "peftlab", "base_model": base_model, **(extra or {})}
    if restart is not None:
        meta["start"] = restart
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    old = None
    try:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it private
        if peft:
            base = base_model if peft_base is _SAME else peft_base
            config = {**adapter.peft_config(model, targets), "base_model_name_or_path": base}
            (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
            state = {adapter.peft_key_prefix + k: v for k, v in state.items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / OURS).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        if folder.exists():  # an earlier adapter (its files alone): set aside, then gone once the new one is in
            old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old."))
            os.replace(folder, old / "a")
        os.replace(tmp, folder)
    except BaseException:
        if old is not None and (old / "a").exists() and not folder.exists():
            os.replace(old / "a", folder)  # put the earlier adapter back
        raise
    finally:
        for t in (tmp, old):
            if t is not None and t.exists():
                shutil.rmtree(t)
    return folder


def read_adapter_info(folder: str | os.PathLike) -> dict[str, Any]:
    """What a saved adapter folder says of itself: peftlab's description, else peft's config.
    A missing or damaged file is an error naming it (:class:`~peftlab.readback.DamagedFile`)."""
    from peftlab.readback import read_json

    folder = Path(folder)
    if not (folder / WEIGHTS).is_file():
        found = ", ".join(sorted(p.name for p in folder.iterdir())) if folder.is_dir() else "nothing"
        raise ValidationError("adapter folder", str(folder), f"a saved adapter with {WEIGHTS} (found: {found})")
    if (folder / OURS).is_file():
        if (folder / PEFT_CONFIG).is_file():  # what peft reads: damaged, the folder is no longer peft's
            read_json(folder / PEFT_CONFIG, "peft adapter config")
        info = read_json(folder / OURS, "peftlab adapter description")
        if not isinstance(info.get("adapter"), str) or not isinstance(info.get("settings"), dict):
            from peftlab.readback import DamagedFile

            raise DamagedFile(folder / OURS, "peftlab adapter description", "it lacks the adapter's name "
                              "(\"adapter\": a string) or its settings (\"settings\": an object)")
        return info
    if (folder / PEFT_CONFIG).is_file():
        config = read_json(folder / PEFT_CONFIG, "peft adapter config")
        if not isinstance(config.get("peft_type"), str):
            from peftlab.readback import DamagedFile

            raise DamagedFile(folder / PEFT_CONFIG, "peft adapter config", "it has no \"peft_type\" string")
        return {"layout": "peft", "peft": config}
    raise ValidationError("adapter folder", str(folder), f"a folder with {OURS} or peft's {PEFT_CONFIG}")


def saved_base(info: dict[str, Any]) -> str | None:
    """The base a saved adapter names: peftlab's name for it, else peft's ``base_model_name_or_path``."""
    return info.get("base_model") or info.get("peft", {}).get("base_model_name_or_path")


def adapter_from_info(info: dict[str, Any], model: nn.Module, host) -> Adapter:
    """The adapter (built, not attached) a saved folder's description says, for ``model``: peftlab's
    own by name and settings; one peft saved by the installed adapter that declares its ``peft_type``."""
    if "peft" in info:
        peft_type = info["peft"].get("peft_type")
        makers = {spec.name: spec for spec in host.adapters
                  if getattr(spec.factory, "peft_type", None) == peft_type}
        if not makers:
            known = sorted({t for spec in host.adapters if (t := getattr(spec.factory, "peft_type", None))})
            raise ValidationError("adapter_config.peft_type", peft_type, "a method an installed adapter plugin "
                                  f"loads from peft ({', '.join(known)})")
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
    return host.adapters.build(name, **settings)


def check_adapter_folder(folder: str | os.PathLike, skeleton: nn.Module | None,
                         host) -> tuple[dict[str, Any], str | None]:
    """Everything a saved adapter folder can say before a model is loaded: its description and the
    safetensors header are readable, an installed adapter rebuilds it, and (given ``skeleton``, the
    base built on the meta device: shapes, no weights) the tensors it holds are the ones that adapter
    has on this base, with the same shapes. Returns the folder's description and the name of the
    adapter that loads it (``None`` where that needs the model: a peft folder with no skeleton)."""
    from peftlab.quantize.safetensors_files import read_header

    folder = Path(folder)
    info = read_adapter_info(folder)
    header = read_header(folder / WEIGHTS)
    if skeleton is None:
        return info, info.get("adapter")
    adapter = adapter_from_info(info, skeleton, host)
    attach(skeleton, adapter)
    want = {k: tuple(v.shape) for k, v in adapter.state_dict(skeleton).items()}
    if info.get("layout") == "peft":
        header = {k.removeprefix(adapter.peft_key_prefix): v for k, v in header.items()
                  if k not in adapter.peft_extra_keys}
    have = {k: tuple(e.shape) for k, e in header.items()}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or extra or wrong:
        base = saved_base(info)
        said = []
        if wrong:
            said.append(f"{len(wrong)} tensors of another shape (e.g. {wrong[0]}: {have[wrong[0]]} saved, "
                        f"{want[wrong[0]]} on this base)")
        if missing:
            said.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if extra:
            said.append(f"{len(extra)} this base has no place for (e.g. {extra[0]})")
        raise ValidationError("adapter folder", str(folder), f"an adapter saved for this base ({adapter.name}); "
                              f"it was saved for {base or 'an unnamed base'}, and its {WEIGHTS} holds "
                              + "; ".join(said) + ". Nothing was loaded")
    return info, adapter.name


def load_adapter(model: nn.Module, folder: str | os.PathLike, host, adapter: Adapter | None = None,
                 ) -> tuple[Adapter, AttachReport]:
    """Attach the adapter saved in ``folder`` to ``model`` (a fresh base) with its trained weights;
    ``adapter``: the one the folder describes, built already (a start from the weights ran on it:
    its folder's ``start``)."""
    from safetensors.torch import load_file

    info = read_adapter_info(folder)
    if info.get("start") and adapter is None:
        raise ValidationError("adapter folder", str(folder), f"a cell that runs its start again: it was trained from "
                              f"{info['start'].get('init')} over a base {info['start'].get('quantizer')} packed from "
                              "the weight the start left (peftlab run/sweep with adapter_from and that quantizer)")
    adapter = adapter or adapter_from_info(info, model, host)
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
