"""The record: what one cell says about itself, declared once.

A cell's record is one flat mapping of keys to plain values (strings, numbers, booleans, ``None``),
written atomically as JSON under ``results/<experiment>/cells/``. It is the product of the engine
and the interface between the cell, the sweep, the reports and third-party hooks
(``peftlab_cell_finished``). Every key any stage writes is declared here: its type, unit, the
stage that writes it and what it means. Tables take their fixed columns' types from here, the
store its completeness rule, the migration its list of added fields, and the reference page
(``docs/reference/record.md``) its rows; a test runs cells and fails on any key not declared.

Components add keys of their own through the patterns at the end: an adapter's settings
(``adapter.<setting>``), a metric's scores (``metric.<name>``, ``metric.<name>.<score>``, and
``before.metric...`` for the untrained model), and package versions (``version.<package>``).

Types: ``str``, ``int``, ``float``, ``bool``, ``number`` (an int or a float, e.g. an adapter's
size), ``json`` (a JSON text: the grid axes, metric settings). A value may be ``None`` where the
quantity does not apply (no glibc, no GPU, an adapter without a size).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: the stages of a cell, in order, and what they add to its record
STAGES = {
    "identity": "which planned cell the record belongs to (the sweep writes these)",
    "settings": "the cell's own settings and provenance, known before anything runs",
    "load": "the model and the data as loaded",
    "quantize": "the base's quantization",
    "attach": "the adapter as attached, and the frozen weights' storage",
    "train": "the training run",
    "measure": "peak memory",
    "generate": "generation on the evaluation inputs",
    "score": "the metrics' scores",
    "keep": "what the cell wrote beside its record",
    "tune": "a tuning trial's place in its search (trials only; peftlab.sweep.tuner)",
}
#: what a record's ``status`` may be
STATUSES = ("ok", "skipped", "failed")


@dataclass(frozen=True)
class Field:
    """One key of the record."""

    key: str
    type: str  # str, int, float, bool, number, json
    stage: str  # a key of STAGES
    meaning: str
    unit: str = ""  # bytes, s, tokens/s, %, ...
    since: str = ""  # the record version that added it ("v2"), where older records lack it


def _f(key: str, type_: str, stage: str, meaning: str, unit: str = "", since: str = "") -> Field:
    return Field(key, type_, stage, meaning, unit, since)


FIELDS: tuple[Field, ...] = (
    # identity: the sweep's, so that a record is never taken for another cell's or another run's
    _f("cell_id", "str", "identity", "a hash of the cell's full settings: the same settings, the same record file"),
    _f("label", "str", "identity", "the grid values that made the cell, in words"),
    _f("group", "str", "identity", "the label without the seed: the cells a summary row aggregates"),
    _f("axes", "json", "identity", "the grid values that made the cell"),
    _f("run_id", "str", "identity", "the inputs file the worker ran from (a record left by an earlier run has another)"),
    _f("status", "str", "identity", "ok, skipped (vetoed, with the reason) or failed (with the reason)"),
    _f("reason", "str", "identity", "why the cell was skipped or failed; empty when ok"),
    _f("error.traceback", "str", "identity", "the last frames of the exception a failed worker raised"),
    _f("sweep.jobs", "int", "identity", "cells the sweep ran at once (--jobs), which changes throughput"),
    _f("command", "str", "identity", "the `peftlab run` command that made the record"),
    # settings
    _f("model", "str", "settings", "the model as the user named it (short name, hub id, folder or .gguf file)"),
    _f("adapter", "str", "settings", "the adapter's registered name"),
    _f("quantizer", "str", "settings", "the base's quantizer, or none"),
    _f("data", "str", "settings", "the training data as the user named it"),
    _f("train.steps_planned", "int", "settings", "optimizer steps asked for (None: epochs)"),
    _f("train.optimizer", "str", "settings", "adamw, adamw8bit, paged-adamw, paged-adamw8bit"),
    _f("train.precision", "str", "settings", "the compute dtype: bf16 autocast or fp32"),
    _f("train.grad_checkpointing", "bool", "settings", "activations recomputed in backward"),
    _f("train.frozen_dtype", "str", "settings", "frozen linear weights stored in the compute dtype or the model's"),
    _f("train.attention", "str", "settings", "the attention setting for training (auto, peftlab-cpu, ...)"),
    _f("train.norm", "str", "settings", "the RMSNorm setting for training (auto, lean, model)"),
    _f("train.compile", "str", "settings", "the compiled-layers setting for training (auto, layers, off)"),
    _f("train.packing", "str", "settings", "the packing setting for training (auto: examples share rows where they can; off)"),
    _f("train.batch_size", "int", "settings", "examples per micro-batch"),
    _f("train.grad_accum", "int", "settings", "micro-batches per optimizer step"),
    _f("train.lr", "float", "settings", "peak learning rate"),
    _f("train.seed", "int", "settings", "training, data and sampling seed"),
    _f("memory_mode", "str", "settings", "what the peak memory reads: cuda (the allocator's counters), or on CPU "
       "heap, rss or rss-strict"),
    _f("eval.batch_size", "int", "settings", "inputs generated at once"),
    _f("eval.attention", "str", "settings", "the attention setting for generation"),
    _f("machine.id", "str", "settings", "a hash of the host name: which machine made the record"),
    _f("adapter.trains_base", "bool", "settings", "the adapter trains the base model's own weights", since="v2"),
    _f("adapter.size_setting", "str", "settings", "the setting that sizes the adapter (LoRA's r), if any", since="v2"),
    _f("adapter.size", "number", "settings", "that setting's value: what reports plot trainable parameters against",
       since="v2"),
    _f("adapter.from", "str", "settings", "the saved adapter folder the cell started from"),
    _f("adapter.from_quantizer", "str", "settings", "the base's quantizer when that adapter was trained (none: float)"),
    # load
    _f("device", "str", "load", "the CPU model and threads, or the GPU, the cell ran on"),
    _f("cell.threads", "int", "load", "torch threads the cell ran with"),
    _f("model.source", "str", "load", "where the model came from, as the user named it (never a machine path)"),
    _f("model.from_cache", "bool", "load", "read from peftlab's float copy of a GGUF model"),
    _f("model.dtype", "str", "load", "the dtype the weights were loaded in"),
    _f("data.train_rows", "int", "load", "training rows after the limits"),
    _f("data.dropped_too_long", "int", "load", "training rows dropped: their response did not fit data.max_length"),
    _f("data.truncated", "int", "load", "training rows whose prompt was cut to fit"),
    _f("data.eval_inputs", "int", "load", "evaluation inputs scored (references grouped)"),
    _f("data.eval_references", "int", "load", "references over those inputs"),
    _f("data.eval_source", "str", "load", "where the evaluation inputs came from"),
    _f("data.eval_split", "str", "load", "their split (test, validation, holdout, ...; all: the whole of a one-file data.eval_source)"),
    _f("data.eval_inputs_available", "int", "load", "evaluation inputs before data.eval_limit"),
    _f("data.eval_sample", "str", "load", "which inputs the limit kept: random, first, or all"),
    _f("data.eval_hash", "str", "load", "a hash of the evaluation inputs: equal hashes, comparable scores"),
    # quantize
    _f("quant.layers", "int", "quantize", "linear layers quantized"),
    _f("quant.bytes_before", "int", "quantize", "those layers' weight bytes before", "bytes"),
    _f("quant.bytes_after", "int", "quantize", "their bytes as stored after (codes and constants)", "bytes"),
    _f("quant.while_loading", "bool", "quantize", "quantized as the checkpoint was read"),
    _f("quant.calibration.batches", "int", "quantize", "training batches the calibration pass ran through the float "
       "model before a calibrated quantizer (GPTQ) packed it (the first of the training stream; 0: no pass)"),
    _f("quant.calibration.tokens", "int", "quantize", "tokens of those batches (padding left out)"),
    _f("quant.calibration.seed", "int", "quantize", "the seed of the batches' order (train.seed)"),
    _f("quant.calibration.seconds", "float", "quantize", "the pass's time", "s"),
    _f("quant.calibration.layers", "int", "quantize", "layers whose inputs it recorded"),
    _f("quant.calibration.form", "str", "quantize", "sequential (each block calibrated on the packed blocks' "
       "outputs, one block's sums at a time) or one-pass (every layer on the float model's activations)"),
    _f("start.from_weights", "bool", "quantize", "the adapter's start was computed from the weights (PiSSA, OLoRA, "
       "LoftQ) before the quantizer packed them"),
    _f("start.layers", "int", "quantize", "the adapter's target layers start.error averages over"),
    _f("start.error", "float", "quantize", "mean over the target layers of ||W - base - update|| / ||W|| "
       "(Frobenius) at the start: W the float weight, base the quantized base, update the adapter's start"),
    _f("start.error_max", "float", "quantize", "the largest of those layer errors"),
    _f("base.weight_bytes", "int", "quantize", "the base model's weight bytes as stored", "bytes"),
    # attach
    _f("cast.layers", "int", "attach", "frozen linear layers stored in the compute dtype"),
    _f("cast.bytes_saved", "int", "attach", "bytes that saved (negative where untying a shared weight cost more)",
       "bytes"),
    _f("cast.untied", "str", "attach", "tied weights untied to be stored apart (comma-separated)"),
    _f("params.trainable", "int", "attach", "trainable parameters (logical: a packed weight counts its elements)"),
    _f("params.total", "int", "attach", "all parameters, logical"),
    _f("params.trainable_pct", "float", "attach", "trainable over total", "%"),
    _f("adapter.targets", "int", "attach", "modules the adapter adapted"),
    _f("params.backward_blocks", "int", "attach", "transformer blocks backward runs through", since="v2"),
    _f("params.trainable_bytes", "int", "attach", "bytes of the trainable parameters", "bytes", since="v2"),
    # train
    _f("train.steps", "int", "train", "optimizer steps run"),
    _f("train.epochs", "float", "train", "passes over the training rows"),
    _f("train.tokens", "int", "train", "non-padding tokens seen in training"),
    _f("train.max_batch_positions", "int", "train", "the largest micro-batch's positions, padding included"),
    _f("train.seconds", "float", "train", "time inside training steps, the first included", "s"),
    _f("train.tokens_per_s", "float", "train", "non-padding training tokens per second from "
       "train.throughput_from_step on", "tokens/s"),
    _f("train.first_step_s", "float", "train", "the first step alone (setup, kernel selection, first touch)", "s"),
    _f("train.throughput_from_step", "int", "train", "the first step tokens/s counts (2 where there were two or more)"),
    _f("train.master_dtype", "str", "train", "the dtype of the weights the optimizer updates"),
    _f("train.bf16_matmul", "str", "train", "how bf16 matrix products ran: native, or fp32-gemm on CPUs without "
       "bf16 units"),
    _f("train.optimizer_note", "str", "train", "what the optimizer did differently on this device, if anything"),
    _f("train.attention_impl", "str", "train", "the attention implementation training ran"),
    _f("train.lean_norms", "int", "train", "RMSNorm modules that ran the lean forward"),
    _f("train.compiled_layers", "int", "train", "decoder layers that trained compiled"),
    _f("train.compiled_from_step", "int", "train", "the first step they ran compiled (0: none did)"),
    _f("train.compile_s", "float", "train", "what compiling the layers cost: the first step's time (it compiled them) "
       "over the second's (0: nothing compiled)", "s"),
    _f("train.packed", "str", "train", "whether micro-batches trained packed: on and how rows were formed, or off and why"),
    _f("train.pad_fraction", "float", "train", "the share of the positions trained on that were padding"),
    _f("train.pad_fraction_unpacked", "float", "train", "the share padding takes with each micro-batch padded to its "
       "longest example"),
    _f("train.tokens_per_step", "float", "train", "real (non-padding) training tokens per optimizer step", "tokens"),
    _f("loss.first", "float", "train", "the first step's training loss"),
    _f("loss.final", "float", "train", "the last step's training loss"),
    _f("loss.mean", "float", "train", "the mean training loss over the steps"),
    _f("mem.paged_state_bytes", "int", "train", "optimizer state in paged (CUDA managed) memory", "bytes"),
    _f("train.stopped_at", "int", "train", "the step after which the tuning pruner stopped training (the cell "
       "then ends unevaluated)"),
    # measure
    _f("mem.peak_bytes", "int", "measure", "the training peak the memory_mode reads, model included", "bytes"),
    _f("mem.peak_kind", "str", "measure", "which reading mem.peak_bytes is"),
    _f("mem.cpu_peak_rss_delta_bytes", "int", "measure", "peak resident set minus the one before the model", "bytes"),
    _f("mem.cpu_peak_rss_bytes", "int", "measure", "peak resident set", "bytes"),
    _f("mem.cpu_peak_reset", "bool", "measure", "the resident-set peak was reset before training"),
    _f("mem.cpu_strict_heap", "bool", "measure", "freed memory left the resident set (rss-strict)"),
    _f("mem.cpu_heap_peak_delta_bytes", "int", "measure", "peak of malloc's bytes in use minus the start", "bytes"),
    _f("mem.cpu_heap_samples", "int", "measure", "readings of the heap"),
    _f("mem.cpu_heap_sampler_cpu_s", "float", "measure", "CPU time the heap readings took", "s"),
    _f("mem.cpu_heap_kept", "bool", "measure", "freed memory was kept for the next step (glibc thresholds)"),
    _f("mem.cuda_peak_allocated_bytes", "int", "measure", "the CUDA allocator's peak of live tensors", "bytes"),
    _f("mem.cuda_peak_reserved_bytes", "int", "measure", "its peak of reserved bytes", "bytes"),
    _f("mem.load_peak_rss_delta_bytes", "int", "measure", "the resident-set peak while loading", "bytes"),
    _f("mem.load_heap_peak_delta_bytes", "int", "measure", "the heap peak while loading", "bytes"),
    _f("time.wall_s", "float", "measure", "the whole cell, start to end", "s"),
    # generate
    _f("gen.tokens", "int", "generate", "tokens generated"),
    _f("gen.seconds", "float", "generate", "time generating", "s"),
    _f("gen.tokens_per_s", "float", "generate", "generated tokens per second", "tokens/s"),
    _f("gen.attention_impl", "str", "generate", "the attention implementation generation ran"),
    _f("gen.packed_linears", "int", "generate", "linear layers that multiplied with weights laid out once"),
    _f("gen.bf16_matmul", "str", "generate", "how bf16 matrix products ran: native, or fp32-gemm (weights widened "
       "once) on CPUs without bf16 units"),
    _f("gen.rows_leave", "bool", "generate", "finished rows left the batch"),
    _f("loss.eval", "float", "score", "the mean cross-entropy per response token over every evaluation input with "
       "each of its references (eval.loss = true), in training's arithmetic", "nats"),
    _f("loss.eval_tokens", "int", "score", "the response tokens loss.eval averages over", "tokens"),
    _f("forget.loss_base", "float", "score", "the bare base model's mean next-token loss on the general text "
       "(eval.forgetting), measured before the adapter was attached (after, where the adapter's start rewrote the "
       "base: see forget.definition)", "nats"),
    _f("forget.loss_after", "float", "score", "the trained model's loss on the same windows", "nats"),
    _f("forget.delta", "float", "score", "forgetting: forget.loss_after minus forget.loss_base (positive: worse "
       "on general text than the base)", "nats"),
    _f("forget.tokens", "int", "score", "the tokens of general text measured", "tokens"),
    _f("forget.text", "str", "score", "which general text (the shipped sample, or the user's file name)"),
    _f("forget.definition", "str", "score", "what forget.delta measures, in words"),
    _f("sample.prediction", "str", "generate", "the first evaluation input's prediction"),
    _f("sample.references", "json", "generate", "its references"),
    # score
    _f("metric.settings", "json", "score", "each metric's settings: what its scores mean"),
    # keep
    _f("predictions.file", "str", "keep", "the predictions file (inputs, references, prediction per line)"),
    _f("adapter.saved", "str", "keep", "where the trained adapter was saved"),
    _f("adapter.disk_bytes", "int", "keep", "the saved adapter's size on disk (where not kept: saved to a scratch "
       "folder, measured, deleted)", "bytes"),
    _f("adapter.merged", "str", "keep", "where the base with the adapter merged in was saved"),
    _f("tune.group", "str", "tune", "the method (grid group) the trial tunes"),
    _f("tune.trial", "int", "tune", "the trial's number in its study"),
    _f("tune.study", "str", "tune", "the Optuna study (group, search and machine) in tuning/optuna.journal"),
    _f("tune.params", "json", "tune", "the searched settings' values this trial ran with"),
    _f("tune.metric", "str", "tune", "what the trial is judged by: loss (loss.eval) or a metric column"),
    _f("tune.curve", "json", "tune", "the validation losses it reported to the pruner: [[step, loss], ...]"),
    _f("tune.note", "str", "tune", "what the trial did differently (not pruned: its study could not be reached)"),
    _f("keep.error", "str", "keep", "what the cell made but could not write (a full disk, a vanished folder), "
       "and where; the record's numbers stand"),
)

#: keys components add, by pattern: (regex, type, stage, meaning)
PATTERNS: tuple[tuple[str, str, str, str], ...] = (
    (r"adapter\.[a-z_][a-z0-9_]*", "any", "settings", "one of the adapter's own settings (lists and dicts as JSON text)"),
    (r"metric\.[^.\s]+(\.[^\s]+)?", "float", "score", "a metric's score (metric.NAME), or one of its scores "
     "(metric.NAME.SCORE)"),
    (r"before\.metric\.[^.\s]+(\.[^\s]+)?", "float", "score", "the same, for the untrained model (eval.before)"),
    (r"version\.[a-z_][a-z0-9_.-]*", "str", "settings", "a package's version, and version.commit: the peftlab commit"),
)

BY_KEY: dict[str, Field] = {f.key: f for f in FIELDS}
_COMPILED = [(re.compile(p), t, s, m) for p, t, s, m in PATTERNS]
#: what every complete record holds
IDENTITY = ("cell_id", "label", "group", "axes", "status")
#: pandas dtypes of the record's types
PANDAS = {"str": "string", "json": "string", "int": "Int64", "float": "float64", "bool": "boolean", "number": "Float64"}


def declared(key: str) -> bool:
    """Whether ``key`` is declared, by name or by a component's pattern."""
    return key in BY_KEY or any(p.fullmatch(key) for p, *_ in _COMPILED)


def undeclared(record: dict[str, object]) -> list[str]:
    """The keys of ``record`` that nothing declares."""
    return sorted(k for k in record if not declared(k))


def pandas_dtype(key: str) -> str:
    """The pandas dtype a table gives the declared ``key``."""
    return PANDAS[BY_KEY[key].type]


def added_in(version: str) -> tuple[str, ...]:
    """The keys a record version added (older records lack them until migrated)."""
    return tuple(f.key for f in FIELDS if f.since == version)
