"""Rank versus trainable parameters: the lecture's table, and real architectures' counts.

The lecture treats a whole model of N parameters as one square matrix of side sqrt(N), so LoRA
at rank r trains r x (sqrt(N) + sqrt(N)) = 2 r sqrt(N) parameters. Real models adapt many
rectangular matrices; :func:`architecture_counts` instantiates their configurations on the meta
device (no weights, no download) and counts what LoRA adds for a set of target modules.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import peftlab.defaults as defaults
from peftlab.architectures import ARCHITECTURES, meta_model
from peftlab.plugin.errors import ValidationError

if TYPE_CHECKING:
    from peftlab.host import PluginHost
    from peftlab.plugin.adapter import Adapter

LECTURE_MODELS = {"7B": 7e9, "13B": 13e9, "70B": 70e9, "180B": 180e9}
LECTURE_RANKS = (1, 2, 8, 16, 512, 1024, 8192)


def lecture_count(rank: int, n_params: float) -> float:
    """2 r sqrt(N): LoRA's A (r x d) and B (d x r) for one d x d matrix with d^2 = N."""
    return 2 * rank * math.sqrt(n_params)


def human(n: float) -> str:
    """The lecture's style: whole K and M, one decimal for B without a trailing .0."""
    if n >= 1e9:
        text = f"{n / 1e9:.1f}"
        return (text[:-2] if text.endswith(".0") else text) + "B"
    if n >= 1e6:
        return f"{n / 1e6:.0f}M"
    return f"{n / 1e3:.0f}K"


def lecture_table() -> list[dict[str, Any]]:
    rows = [{"rank": str(r), **{m: human(lecture_count(r, n)) for m, n in LECTURE_MODELS.items()}}
            for r in LECTURE_RANKS]
    rows.append({"rank": "Full", **{m: human(n) for m, n in LECTURE_MODELS.items()}})
    return rows


#: LoRA targets per architecture: "q/v" (the LoRA paper's choice) and every linear layer
TARGETS = {
    "llama": {"q/v": ["q_proj", "v_proj"], "all-linear": "all-linear"},
    # Falcon and GPT-2 fuse q, k and v into one layer: the closest to "q/v" is that fused layer
    "falcon": {"q/v": ["query_key_value"], "all-linear": "all-linear"},
    "gpt2": {"q/v": ["c_attn"], "all-linear": "all-linear"},
}


def sized_adapter(host: PluginHost, adapter: str, size: Any, targets: str, arch: str) -> Adapter:
    """``adapter`` built at ``size`` of its declared size setting (LoRA's rank), on the
    architecture's ``targets`` (:data:`TARGETS`) where it takes ``target_modules``."""
    cls_size = host.adapters.build(adapter).size_setting
    settings: dict[str, Any] = {}
    if size is not None:
        if cls_size is None:
            raise ValidationError("size", size, f"none: adapter {adapter!r} declares no size setting")
        settings[cls_size] = size
    if targets != "-" and host.adapters.get(adapter).accepts("target_modules"):
        settings["target_modules"] = TARGETS[arch][targets]
    return host.adapters.build(adapter, **settings)


def architecture_counts(name: str, adapter: Adapter) -> dict[str, Any]:
    """What ``adapter`` trains on the architecture ``name`` (meta device: shapes only)."""
    from peftlab.adapt.attach import attach

    model = meta_model(name)
    total_before = sum(p.numel() for p in model.parameters())
    report = attach(model, adapter)
    return {"model": name, "adapter": adapter.family, "size": adapter.size, "layers": len(report.targets),
            "trainable": report.trainable, "base_params": total_before}


def peft_lora_count(name: str, rank: int, targets: str) -> int | None:
    """peft's own count for LoRA at ``rank`` (the peer), or ``None`` without peft."""
    try:
        import peft
    except ImportError:
        return None
    target = TARGETS[ARCHITECTURES[name][0]][targets]
    model = peft.get_peft_model(meta_model(name), peft.LoraConfig(r=rank, target_modules=target))
    return model.get_nb_trainable_parameters()[0]


def peft_method_count(name: str, adapter: Adapter) -> int | None:
    """peft's count for the method ``adapter`` is saved as, configured by the adapter's own
    ``peft_config`` on the architecture ``name`` (meta device), or ``None`` without peft or
    where peft has no such method (or no layer for these targets)."""
    if adapter.peft_type is None:
        return None
    try:
        import peft
    except ImportError:
        return None
    from peftlab.adapt.attach import attach

    ours = meta_model(name)
    report = attach(ours, adapter)
    if not adapter.peft_loads(ours, report.targets):
        return None
    config = {k: v for k, v in adapter.peft_config(ours, report.targets).items() if k != "inference_mode"}
    model = peft.get_peft_model(meta_model(name), peft.get_peft_config(config))
    return model.get_nb_trainable_parameters()[0]


def every_method_table(host: PluginHost, check_peer: bool) -> tuple[list[str], list[dict[str, Any]]]:
    """(d): every registered adapter that keeps the base frozen, at its registered defaults, on
    each architecture, next to peft's count for the same configuration where peft has the method."""
    lines = ["## (d) Every adapter at its defaults, next to peft's count of the same configuration\n",
             "| adapter | size | model | adapted modules | trainable | peft counts |", "|---|---|---|---|---|---|"]
    rows = []
    for spec in sorted(host.adapters, key=lambda s: s.name):
        probe = host.adapters.build(spec.name)
        if probe.trains_base:
            continue
        for name in ("GPT-2-Medium", "Llama-2-7B", "Llama-2-70B"):
            adapter = host.adapters.build(spec.name)
            size = f"{probe.size_setting}={probe.size}" if probe.size_setting else "-"
            try:
                c = architecture_counts(name, adapter)
            except ValidationError as exc:
                rows.append({"model": name, "adapter": spec.name, "section": "d", "refused": str(exc)})
                lines.append(f"| {spec.name} | {size} | {name} | - | refused: {exc} | - |")
                continue
            ref = peft_method_count(name, host.adapters.build(spec.name)) if check_peer else None
            rows.append({**c, "adapter": spec.name, "section": "d", "peer": ref})
            agree = "-" if ref is None else ("equal" if ref == c["trainable"] else f"no ({ref:,})")
            lines.append(f"| {spec.name} | {size} | {name} | {c['layers']} | {c['trainable']:,} | {agree} |")
    lines.append("\n\\- in the last column: peftlab saves the method in its own layout only (the bottleneck adapters, "
                 "LayerNorm tuning), or peft has no layer for these "
                 "targets (peft's OFT does not wrap GPT-2's Conv1D), or the check was skipped (`--no-peft`).\n")
    return lines, rows


#: per adapter name, a peer that counts the same thing: (name, size, targets) -> count
PEERS = {"lora": peft_lora_count}
#: per adapter name, the LoRA paper's Table 3 trainable parameters for GPT-2 M/L at its settings
PAPER_TABLE3 = {"lora": {"size": 4, "GPT-2-Medium": "0.35M", "GPT-2-Large": "0.77M"}}
SIZES = (1, 8, 16, 512)


def ranks_report(host: PluginHost, adapter: str = defaults.ADAPTER, check_peer: bool = True) -> tuple[str, list[dict]]:
    """The rank report for ``adapter`` (LoRA by default): (a) the lecture's 2 r sqrt(N) table,
    (b) real architectures' counts at several sizes (checked against a peer where one is
    known), (c) the LoRA paper's Table 3 figures where it has them for this adapter, (d) every
    adapter at its defaults next to peft's count of the same configuration."""
    probe = host.adapters.build(adapter)
    size_name = probe.size_setting
    sizes = SIZES if size_name else (None,)
    lora_count = probe.peft_type == "LORA"  # the lecture's 2 r sqrt(N) is LoRA's count (A and B of one matrix)
    lines = [f"# Adapter size ({size_name or 'none declared'}) versus trainable parameters: {adapter}\n"]
    if lora_count:
        lines += ["## (a) The lecture's table: 2 r sqrt(N), the whole model as one square matrix\n",
                  "| rank | " + " | ".join(f"Model {m}" for m in LECTURE_MODELS) + " |",
                  "|---" * (len(LECTURE_MODELS) + 1) + "|"]
        lines += ["| " + " | ".join([row["rank"], *(row[m] for m in LECTURE_MODELS)]) + " |" for row in lecture_table()]
        lines.append("\nThe lecture prints the same values except four entries it truncates instead of rounding: "
                     "rank 2 / 7B (334.66K, printed 334K), rank 512 / 70B (270.9M, printed 270M), rank 1024 / 13B "
                     "(233.5M, printed 233M) and rank 8192 / 13B (1.868B, printed 1.8B). "
                     "`tests/analyses/test_ranks.py` pins every entry.\n")
    else:
        lines.append(f"## (a) The lecture's table\n\nThe lecture's 2 r sqrt(N) counts LoRA's two rank-r matrices of "
                     f"one square matrix; {adapter} is not saved as LoRA (its declared size setting: "
                     f"{size_name or 'none'}), so the formula does not describe it and only real counts follow.\n")
    peer = PEERS.get(adapter) if check_peer else None
    lines += [f"## (b) Real architectures, {adapter} (configurations instantiated on the meta device, no weights)\n",
              f"| model | parameters | {size_name or 'size'} | targets | adapted modules | trainable | lecture's 2r√N "
              "| peer agrees |", "|---|---|---|---|---|---|---|---|"]
    rows = []
    for name in ("Llama-2-7B", "Llama-2-13B", "Llama-2-70B", "Falcon-180B"):
        arch = ARCHITECTURES[name][0]
        takes_targets = host.adapters.get(adapter).accepts("target_modules")
        for size in sizes:
            # the LoRA paper's q/v and all-linear choice; any other adapter on its own default targets
            for targets in ("q/v", "all-linear") if takes_targets and lora_count else ("-",):
                try:
                    c = architecture_counts(name, sized_adapter(host, adapter, size, targets, arch))
                except ValidationError as exc:  # a setting this architecture's targets do not allow
                    rows.append({"model": name, "size": size, "targets": targets, "refused": str(exc)})
                    lines.append(f"| {name} | - | {size if size else '-'} | {targets} | - | refused: {exc} | - | - |")
                    continue
                c["targets"] = targets
                c["lecture_estimate"] = lecture_count(size, c["base_params"]) if size and lora_count else None
                ref = peer(name, size, targets) if peer and size == 8 else None
                c["peer"] = ref
                rows.append(c)
                agree = "-" if ref is None else ("yes" if ref == c["trainable"] else f"no ({ref:,})")
                est = human(c["lecture_estimate"]) if c["lecture_estimate"] else "-"
                lines.append(f"| {name} | {human(c['base_params'])} ({c['base_params']:,}) | {size if size else '-'} | "
                             f"{targets} | {c['layers']} | {c['trainable']:,} | {est} | {agree} |")
    lines.append("\nFalcon fuses q, k and v into one `query_key_value` layer, so its \"q/v\" row adapts that fused "
                 "layer. The lecture's single-matrix estimate is far below real counts: a model has hundreds of "
                 "matrices, each adding r x (in + out).\n")
    paper = PAPER_TABLE3.get(adapter)
    if paper:
        size = paper["size"]
        lines += [f"## (c) GPT-2 Medium and Large at {size_name} = {size} on the attention projections, next to the "
                  "LoRA paper\n", f"| model | ours ({size_name}={size}, q/v) | LoRA paper Table 3 |", "|---|---|---|"]
        for name in ("GPT-2-Medium", "GPT-2-Large"):
            c = architecture_counts(name, sized_adapter(host, adapter, size, "q/v", "gpt2"))
            rows.append({**c, "targets": "q/v", "paper": paper[name]})
            lines.append(f"| {name} | {c['trainable']:,} ({c['trainable'] / 1e6:.2f}M) | {paper[name]} |")
        lines.append(LORA_NOTE)
    every, every_rows = every_method_table(host, check_peer)
    lines += every
    rows += every_rows
    lines.append((f"Ranks in (a): {', '.join(map(str, LECTURE_RANKS))}. " if lora_count else "") + "Architectures: "
                 + ", ".join(f"{k} ({v[0]})" for k, v in ARCHITECTURES.items()) + ".")
    return "\n".join(lines) + "\n", rows


LORA_NOTE = (
"\nHugging Face's GPT-2 fuses q, k and v into `c_attn` (d -> 3d); LoRA on it trains r (d + 3d) per block, "
    "exactly what separate W_q and W_v train (2 r (d + d)). Either way r = 4 on every block gives 24 x 16,384 = "
    "393,216 for Medium and 36 x 20,480 = 737,280 for Large. The paper prints 0.35M and 0.77M: neither follows "
    "from r = 4 on W_q and W_v of all blocks (Medium's is 11% lower, Large's 4% higher), and the paper's "
    "appendix does not say what else differs. The authors' own code (`loralib.MergedLinear` with "
    "`enable_lora=[True, False, True]` on `c_attn`) trains A of shape (2r, d) and B of shape (2d, r) per "
    "block, 4 r d = 16,384 for Medium, exactly as counted here; the same question is open upstream without "
    "an answer (microsoft/LoRA issue 172, which also gets 393,216). The printed figures cannot come from the "
    "stated setting, so we treat them as a slip in the paper's table and "
    "report the gap rather than explain it away.\n")
