"""One grid cell: load, quantize, attach, train, generate, score, measure -> one flat record.

Everything cheap is checked first (names, settings, the veto hook, the data and its columns)
so bad input fails in seconds, before a model is loaded. A vetoed combination comes back as a
``skipped`` record with the plugin's reason; a cell whose training diverges comes back
``failed`` with the message. Both keep every field known so far.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import peftlab.defaults as defaults
from peftlab.cell.config import CellConfig
from peftlab.cell.train import TrainingError
from peftlab.host import PluginHost
from peftlab.plugin.errors import PeftlabError, PluginError, ValidationError


@dataclass(frozen=True)
class CellOutputs:
    """Where a cell keeps what it made, beside its record (each optional)."""

    predictions: Path | None = None  # JSON lines: input, references, prediction
    adapter: Path | None = None  # the trained adapter (peft's layout where peft has the method)
    merged: Path | None = None  # the base with the adapter merged in, save_pretrained layout


#: the metrics (name, provider, settings) that scored the one-line check in this process
_SCORED_ONE_LINE: set[tuple[str, str, str]] = set()


def preflight(cfg: CellConfig, host: PluginHost) -> tuple[Any, Any, dict[str, Any], str | None]:
    """Build every component by name (settings are checked by their constructors) and find any
    reason to skip the cell: the adapter's own (one that trains base weights over a quantized
    base) or a plugin's veto hook. Nothing expensive happens here."""
    adapter = host.adapters.build(cfg.adapter, **cfg.adapter_params)
    quantizer = None
    if cfg.quantizer_name is not None:
        quantizer = host.quantizers.build(cfg.quantizer, **cfg.quantizer_params)
        bits = quantizer.nominal_bits()
        bits = bits if isinstance(bits, (int, float)) else 0
        if bits > 32:  # a "quantized" base larger than the float one it replaces measures nothing useful
            raise ValidationError("quantizer_params", cfg.quantizer_params, f"settings under which {cfg.quantizer!r} "
                                  f"stores fewer bits per weight than float32 does; these store {bits:g} "
                                  "(its scales outweigh its codes: use larger blocks)")
        if bits > 16:
            import sys

            print(f"peftlab: warning: quantizer {cfg.quantizer!r} with {cfg.quantizer_params} stores {bits:g} bits "
                  "per weight, more than a 16-bit float base", file=sys.stderr)
    elif cfg.quantizer_params:
        raise ValidationError("quantizer_params", cfg.quantizer_params, "settings only together with a quantizer")
    metrics = {name: host.metrics.build(name, **cfg.eval.metric_params.get(name, {})) for name in cfg.eval.metrics}
    for name, metric in metrics.items():  # a metric that cannot score fails here, not after training
        key = (name, host.metrics.provider(name), json.dumps(cfg.eval.metric_params.get(name, {}), sort_keys=True,
                                                              default=str))
        if key in _SCORED_ONE_LINE:  # once per process: METEOR starts a JVM (11 s), and a sweep plans every cell
            continue
        try:
            metric.compute(["a small check"], [["a small check"]])
        except PeftlabError:
            raise
        except Exception as exc:
            raise PluginError(f"metric {name!r} from plugin {host.metrics.provider(name)!r} failed a one-line check: "
                              f"{type(exc).__name__}: {exc}") from exc
        _SCORED_ONE_LINE.add(key)
    from peftlab.cell.models import resolve

    resolve(cfg.model.name)
    if cfg.eval.forgetting != "none":
        from peftlab.data.general_text import documents

        documents(cfg.eval.forgetting)  # the text exists and reads, before any model is loaded
    if cfg.adapter_from:
        from peftlab.adapt.persist import check_adapter_folder
        from peftlab.cell.models import skeleton

        # the folder's files, the adapter it names and its tensors' shapes on this base, before any loading
        info, saved = check_adapter_folder(cfg.adapter_from, skeleton(cfg.model), host)
        if cfg.adapter_params:
            raise ValidationError("adapter_params", cfg.adapter_params, "none with adapter_from: the saved adapter's "
                                  "own settings are loaded (train a new adapter without adapter_from to change them)")
        if saved is not None and cfg.adapter not in (saved, defaults.ADAPTER):
            raise ValidationError("adapter", cfg.adapter, f"{saved!r} or unset with adapter_from: "
                                  f"{cfg.adapter_from} holds a {saved} adapter, which is what would train")
        if "adapter" in info:
            adapter = host.adapters.build(info["adapter"], **info["settings"])
        restart = info.get("start")
        if restart:  # trained over a base its start left: the same start and quantizer must make it again
            q = host.quantizers.build(cfg.quantizer_name, **cfg.quantizer_params) if cfg.quantizer_name else None
            if q is None or cfg.quantizer_name != restart.get("quantizer") or \
                    json.dumps(q.settings(), sort_keys=True, default=str) != \
                    json.dumps(restart.get("quantizer_settings"), sort_keys=True, default=str):
                raise ValidationError("quantizer", cfg.quantizer_name, f"{restart.get('quantizer')!r} with settings "
                                      f"{restart.get('quantizer_settings')} with adapter_from {cfg.adapter_from}: it was "
                                      f"trained from a {restart.get('init')} start over a base that quantizer packed")
            if cfg.eval.forgetting != "none":
                raise ValidationError("eval.forgetting", cfg.eval.forgetting, f"none with adapter_from {cfg.adapter_from}"
                                      ": its start rewrites the base, so neither the bare base nor the model as this "
                                      "cell starts (the saved adapter, trained already) is forgetting's baseline")
    if cfg.train.grad_checkpointing and not adapter.supports_grad_checkpointing and cfg.train.steps != 0:
        raise ValidationError("train.grad_checkpointing", True, f"false for adapter {cfg.adapter!r}: it passes its "
                              "state through the KV cache, which transformers drops inside checkpointed layers")
    reason = adapter.skip_reason(cfg.quantizer_name) or host.skip_reason(cfg.view())
    return adapter, quantizer, metrics, reason


def packing_refusal(adapter) -> str | None:
    """Why ``adapter`` cannot train on packed rows, where it declares so (``supports_packing``)."""
    if getattr(adapter, "supports_packing", True):
        return None
    return f"adapter {adapter.family!r} does not take packed rows (supports_packing = False)"


def base_record(cfg: CellConfig) -> dict[str, Any]:
    """The record a cell starts from: its settings and provenance (:func:`peftlab.cell.sections.settings`)."""
    from peftlab.cell import sections

    return sections.settings(cfg)


def calibration_pass(model, quantizer, examples: list, train_cfg, pad_id: int):
    """The calibration pass a calibrated quantizer asks for: its number of training batches, the
    first of the training stream (``train.seed``'s order, padded, ``train.batch_size`` each),
    recording the inputs of every layer the quantizer will pack: sequential where the layers are in
    the model's blocks (each block sees the packed blocks before it), else one pass through the float
    model (:mod:`peftlab.quantize.calibrate`)."""
    from itertools import islice

    from peftlab.data.packing import batches
    from peftlab.quantize.apply import select_layers
    from peftlab.quantize.calibrate import calibrate, sequential

    if not examples:
        raise ValidationError("data", "no training examples", f"training examples for {type(quantizer).__name__}'s calibration "
                              "pass (it runs training batches through the float model before packing)")
    stream = batches(examples, train_cfg.batch_size, torch.Generator().manual_seed(train_cfg.seed), pad_id)
    chosen = [b.inputs for b in islice(stream, quantizer.calibration_batches())]
    device = next(model.parameters()).device
    names = [n for n, _ in select_layers(model, None)]
    return sequential(model, names, chosen, device) or calibrate(model, names, chosen, device)


def run_cell(cfg: CellConfig, host: PluginHost, *, progress: bool = True,
             outputs: CellOutputs | None = None, on_step: Callable[..., bool] | None = None) -> dict[str, Any]:
    """Run one cell: load -> quantize -> attach -> train -> generate -> score, each stage adding its
    section of the record (:mod:`peftlab.cell.sections`, declared in :mod:`peftlab.record`).
    ``on_step(steps_done, validation_loss)`` is called after each training step with a function
    that computes the validation loss (:mod:`peftlab.evaluate.loss`) when asked; when it returns
    true, training stops there and the cell ends without evaluating (a pruned tuning trial,
    ``train.stopped_at``)."""
    from peftlab.adapt.attach import attach
    from peftlab.adapt.persist import read_adapter_info
    from peftlab.adapt.starting import StartLog, start_float, starter
    from peftlab.cache import encode_cached
    from peftlab.cell import sections
    from peftlab.cell.measure import PeakMemory, base_weight_bytes
    from peftlab.cell.models import load, skeleton
    from peftlab.cell.train import TrainResult, train
    from peftlab.data.prompts import encode
    from peftlab.data.splits import load_splits
    from peftlab.evaluate.generate import generate
    from peftlab.evaluate.loss import eval_examples
    from peftlab.evaluate.score import score, unusable
    from peftlab.kernels.compiled import check as check_compile
    from peftlab.kernels.heap import reuse_freed_memory
    from peftlab.kernels.precision import FrozenCast, frozen_to_compute
    from peftlab.quantize.apply import quantize_

    wall = time.perf_counter()
    adapter, quantizer, metrics, reason = preflight(cfg, host)

    @functools.cache
    def validation() -> list:  # the evaluation rows as training rows, encoded once (pruner rungs, loss.eval)
        return eval_examples(eval_items, tok, cfg.data.max_length)

    if outputs is not None and outputs.merged is not None and not reason:
        refusal = adapter.merge_refusal(f"quantizer {cfg.quantizer_name!r} packs the weights" if quantizer else None)
        if refusal:
            raise ValidationError("merge_into", str(outputs.merged), refusal[1])
    rec = {**sections.settings(cfg), **sections.adapter(adapter)}
    if reason:
        rec.update(status="skipped", reason=reason)
        return rec
    train_rows, eval_items, eval_info = load_splits(cfg.data)
    device = cfg.model.resolved_device()
    check_compile(cfg.train.compile, device)  # a setting this machine cannot run fails before the model loads
    peak = PeakMemory(device, cfg.memory_mode).start()
    try:  # the sampler thread stops however this ends (a load error, a diverged or interrupted run)
        torch.manual_seed(cfg.train.seed)
        compute = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        starts, streamed = StartLog(), None
        # a saved adapter trained from a start over a quantized base: its start runs again, then its state loads
        saved_info = read_adapter_info(cfg.adapter_from) if cfg.adapter_from else {}  # read once for the cell
        restart = bool(saved_info.get("start"))
        fresh = not cfg.adapter_from or restart
        # a calibrated quantizer (GPTQ) packs after a pass through the float model: never while loading
        calibrated = quantizer is not None and quantizer.calibration_batches() > 0
        if quantizer is not None and fresh and not calibrated:  # a checkpoint quantized as it loads: starts on the way
            skel = skeleton(cfg.model)
            streamed = starter(adapter, quantizer, adapter.start_targets(skel), starts) if skel is not None else None
        loaded = load(cfg.model, seed=cfg.train.seed, quantizer=None if calibrated else quantizer, compute_dtype=compute,
                      trains_base=bool(adapter.trains_base), start=streamed)
        model, tok = loaded.model, loaded.tokenizer
        if cfg.train.steps == 0 and not calibrated:  # evaluate only: no training set is encoded, and the record says none was used
            from types import SimpleNamespace

            train_rows, encoded = [], SimpleNamespace(examples=[], dropped=0, truncated=0)
        else:
            encoded = encode_cached(train_rows, tok, cfg.data.max_length, encode)
        rec.update(sections.load(loaded, device, train_rows, encoded, eval_items, eval_info))
        if quantizer is not None:
            calibration = None
            if calibrated:
                calibration = calibration_pass(model, quantizer, encoded.examples, cfg.train, tok.pad_token_id)
            qrep = loaded.quantized or quantize_(model, quantizer, compute_dtype=compute, start=starter(
                adapter, quantizer, adapter.start_targets(model), starts) if fresh else None,
                calibration=calibration.layers if calibration else None)
            if calibration is not None:  # after packing: a sequential pass runs its blocks as quantize_ asks
                rec.update(calibration.fields(cfg.train.seed))
            calibration = None  # the layers' input sums and the blocks' inputs: not kept through training
            rec.update(sections.quantize(qrep, while_loading=loaded.quantized is not None))
        elif fresh:
            start_float(model, adapter)
        rec.update(starts.fields(adapter))
        rec["base.weight_bytes"] = base_weight_bytes(model)
        # the bare base, before the adapter; where the adapter's start rewrote the base, the model as it starts
        started = adapter.starts_from_weights() and not cfg.adapter_from  # (a restarted one measures no forgetting)
        forget = Forgetting(cfg, model, tok, device) if cfg.eval.forgetting != "none" and not started else None
        torch.manual_seed(cfg.train.seed)
        if cfg.adapter_from:
            from peftlab.adapt.persist import load_adapter

            adapter, report = load_adapter(model, cfg.adapter_from, host, adapter=adapter if restart else None)
            rec.update({"adapter": adapter.name, "adapter.from": str(cfg.adapter_from), **sections.adapter(adapter),
                        **trained_over(cfg, saved_info)})
        else:
            report = attach(model, adapter)
            if started and cfg.eval.forgetting != "none":
                forget = Forgetting(cfg, model, tok, device, Forgetting.STARTED)
        cast = FrozenCast()
        if cfg.train.frozen_dtype == "compute":
            cast = frozen_to_compute(model, cfg.train.precision, keep=report.targets if adapter.reads_base_weights else [])
        rec.update(sections.attach(report, cast, model))
        model.to(device)
        if cfg.eval.before:
            gens = generate(model, tok, eval_items, cfg.eval, device=device, precision=cfg.train.precision, progress=progress)
            rec.update(sections.score(score(gens.texts, eval_items, metrics)[0], None, prefix="before."))
        rec.update(sections.loading_peak(peak.read()))
        peak.reset_peak()
        try:
            if cfg.train.steps == 0:  # evaluate only (a loaded adapter, or the base)
                result = TrainResult()
            else:
                reuse = device.type == "cpu" and cfg.memory_mode != "rss-strict"
                reporter = None
                if on_step is not None:
                    def reporter(steps: int) -> bool:
                        return on_step(steps, lambda: measured_loss(cfg, model, validation(), tok, device).loss)
                with reuse_freed_memory(reuse) as kept:
                    rec["mem.cpu_heap_kept"] = kept
                    result = train(model, encoded.examples, cfg.train, pad_id=tok.pad_token_id, device=device,
                                   progress=progress, param_groups=adapter.param_groups(model), on_peak=peak.sample,
                                   packing_refusal=packing_refusal(adapter), on_step=reporter)
        except TrainingError as exc:
            rec.update(status="failed", reason=str(exc), **peak.read(), **{"time.wall_s": time.perf_counter() - wall})
            return rec
        rec.update(sections.train(result))
        rec.update(peak.read(paged_bytes=result.paged_state_bytes))  # the training peak, before generation's caches
    finally:
        peak.stop()
    if result.stopped_at:  # stopped by on_step: a pruned trial is judged by what it reported, nothing more
        rec["train.stopped_at"] = result.stopped_at
        rec["time.wall_s"] = time.perf_counter() - wall
        return rec
    if forget is not None:
        rec.update(forget.after(model))
    if cfg.eval.loss:
        measured = measured_loss(cfg, model, validation(), tok, device)
        rec.update({"loss.eval": measured.loss, "loss.eval_tokens": measured.tokens})
    bad = {}
    gens = None
    if cfg.eval.generate:
        gens = generate(model, tok, eval_items, cfg.eval, device=device, precision=cfg.train.precision,
                        progress=progress)
        scores, metric_settings = score(gens.texts, eval_items, metrics)
        bad = unusable(scores)
        rec.update(sections.score({k: (None if k in bad else v) for k, v in scores.items()}, metric_settings))
        rec.update(sections.generate(gens, eval_items))
    rec["time.wall_s"] = time.perf_counter() - wall
    if bad:  # a NaN would pass for a score in every table: the cell says it failed, and why
        rec.update(status="failed", reason="; ".join(
            f"metric {k.removeprefix('metric.')!r} (plugin {host.metrics.provider(k.split('.')[1])!r}) returned {v!r}, "
            "not a finite number" for k, v in bad.items()))
    keep(outputs or CellOutputs(), rec, eval_items, gens.texts if gens else None, model, adapter, report.targets,
         tok, cast, base_model=loaded, disk_size=cfg.eval.generate)
    return rec


class Forgetting:
    """What fine-tuning costs the model outside the task: the mean next-token loss on general text
    (``eval.forgetting``) of the bare base, measured when built (before any adapter is attached),
    and of the trained model (:meth:`after`), in training's arithmetic."""

    DEFINITION = ("mean next-token cross-entropy (nats per token) on the general text after training minus the "
                  "same on the bare base model (as loaded and quantized, before the adapter was attached)")
    #: for an adapter whose start rewrote the base (PiSSA, OLoRA, LoftQ): the bare base is then a
    #: residual that is not the model, and the baseline is the model as training starts
    STARTED = ("mean next-token cross-entropy (nats per token) on the general text after training minus the same "
               "on the model as training started (the base the adapter's start left, quantized if the cell quantizes, "
               "plus that start: the loaded model itself, up to rounding and quantization)")

    def __init__(self, cfg: CellConfig, model, tok, device, definition: str = DEFINITION):
        from peftlab.data.general_text import documents, windows

        self.cfg, self.tok, self.device, self.definition = cfg, tok, device, definition
        self.examples = [(ids, ids) for ids in windows(documents(cfg.eval.forgetting), tok, cfg.eval.forgetting_tokens)]
        self.base = measured_loss(cfg, model, self.examples, tok, device)

    def after(self, model) -> dict[str, Any]:
        from peftlab.data.general_text import describe

        now = measured_loss(self.cfg, model, self.examples, self.tok, self.device)
        return {"forget.loss_base": self.base.loss, "forget.loss_after": now.loss,
                "forget.delta": now.loss - self.base.loss, "forget.tokens": now.tokens,
                "forget.text": describe(self.cfg.eval.forgetting), "forget.definition": self.definition}


def folder_bytes(folder: Path) -> int:
    """The bytes of the files under ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def measured_loss(cfg: CellConfig, model, examples, tok, device):
    """The mean loss of ``examples`` (:func:`peftlab.evaluate.loss.eval_loss`) in training's
    arithmetic: its attention (entered here, a no-op inside training, which has switched it
    already), precision and batch size. The validation loss and forgetting's both."""
    from peftlab.evaluate.loss import eval_loss
    from peftlab.kernels.attention import attention, resolve

    with attention(model, resolve(cfg.train.attention, device)):
        return eval_loss(model, examples, pad_id=tok.pad_token_id, device=device, precision=cfg.train.precision,
                         batch_size=cfg.train.batch_size)


def trained_over(cfg: CellConfig, info: dict[str, Any]) -> dict[str, Any]:
    """The base a loaded adapter was trained over (``adapter.from_quantizer``), where its folder's
    ``info`` says (peftlab writes it); a base quantized otherwise is legitimate (QLoRA's adapters
    serve a float base), and said on stderr, since outputs then differ by the quantization error."""
    import sys

    then = info.get("quantizer")
    if then is None:
        return {}
    now = cfg.quantizer_name or "none"
    if then != now:
        print(f"peftlab: note: the adapter in {cfg.adapter_from} was trained over a base quantized with {then}; this "
              f"cell's base is {'float' if now == 'none' else 'quantized with ' + now} (outputs differ by the "
              "difference in quantization)", file=sys.stderr)
    return {"adapter.from_quantizer": then}


def keep(out: CellOutputs, rec: dict[str, Any], items, texts, model, adapter, targets, tok, cast=None,
         base_model: Any = None, disk_size: bool = False) -> None:
    """Write what the cell made where ``out`` says, and say in the record where it went. A saved
    adapter names the base it was trained over (``base_model``, the :class:`~peftlab.cell.models.Loaded`
    model). A write that fails (a full disk, a vanished folder) costs only that output: the record
    keeps every number and says in ``keep.error`` what was not written, and where."""
    from peftlab.adapt.persist import merge_into, save_adapter
    from peftlab.evaluate.predictions import write_predictions

    errors = []

    def attempt(what: str, path: Path, write) -> bool:
        try:
            write()
            return True
        except Exception as exc:  # OSError, safetensors' SafetensorError on a full disk, ...
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
            errors.append(f"{what} was not written to {path}: {reason}")
            return False

    if out.predictions and texts is not None and attempt("the predictions file", out.predictions,
                                   lambda: write_predictions(out.predictions, items, texts)):
        rec["predictions.file"] = str(out.predictions)
    if out.adapter:
        from peftlab.cell.models import adapter_bases

        bases = adapter_bases(base_model)
        extra = {"quantizer": rec.get("quantizer"), "cell": {k: rec.get(k) for k in ("label", "cell_id")}}
        if attempt("the adapter", out.adapter, lambda: save_adapter(model, adapter, targets, out.adapter,
                                                                    base_model=bases[0], peft_base=bases[1], extra=extra)):
            rec["adapter.saved"] = str(out.adapter)
            rec["adapter.disk_bytes"] = folder_bytes(out.adapter)
    elif disk_size:  # what keeping it would take: saved to a scratch folder, measured, deleted
        import tempfile

        from peftlab.cell.models import adapter_bases

        bases = adapter_bases(base_model)
        with tempfile.TemporaryDirectory(prefix="peftlab-adapter-size-") as scratch:
            try:
                folder = save_adapter(model, adapter, targets, Path(scratch) / "adapter", base_model=bases[0],
                                      peft_base=bases[1])
                rec["adapter.disk_bytes"] = folder_bytes(folder)
            except Exception as exc:  # a full scratch disk costs this figure only
                rec["adapter.disk_bytes"] = None
                errors.append(f"the adapter's size on disk was not measured: {type(exc).__name__}: {exc}")
    if out.merged:
        def merge():
            if cast is not None:  # merge in the model's dtype (values stay the ones the cell computed with)
                from peftlab.kernels.precision import restore_dtype

                restore_dtype(cast)
            merge_into(model, adapter, tok, out.merged)
        if attempt("the merged model", out.merged, merge):
            rec["adapter.merged"] = str(out.merged)
    if errors:
        rec["keep.error"] = "; ".join(errors)
