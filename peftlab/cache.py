"""What every cell of a sweep would otherwise rebuild, kept on disk between cells and runs.

The folder is ``$PEFTLAB_CACHE``, else ``$XDG_CACHE_HOME/peftlab``, else ``~/.cache/peftlab``;
``PEFTLAB_CACHE=off`` turns caching off. Each entry's name is a hash of everything its content
depends on, so the invalidation rule is simply that a changed input is a different entry (stale
ones are never read, and ``peftlab cache --clear`` deletes them all). Entries are written beside
their final name and renamed into place, so a reader sees a whole entry or none.

- ``models/<key>/``: a GGUF model dequantized to float, saved with ``save_pretrained`` (safetensors,
  config and tokenizer). Key: the GGUF file's path, size and modification time, the transformers,
  gguf and torch versions, and the dtype. Reading it back takes about a second; dequantizing the
  embedded SmolLM2 GGUF took 10 to 20 s per cell.
- ``probes/<key>``: a plugin component that passed its load-time contract check
  (:mod:`peftlab.probe`), so later commands skip the check. Key: the component's source file,
  peftlab's author API, and the Python, torch, bitsandbytes and transformers versions.
- ``tokens/<key>.pt``: a data split's tokenized training examples. Key: the tokenizer's full
  serialised form (vocabulary, merges, normaliser, chat template), the rows themselves, the
  maximum length and the prompt format's version.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from peftlab.atomic import atomic_path
from peftlab.cachedir import cache_root, digest

#: bump when peftlab's prompt rendering or tokenization changes what ``encode`` returns
PROMPT_FORMAT = 1


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("transformers", "gguf", "torch", "tokenizers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def gguf_key(path: str, dtype: str) -> str:
    st = os.stat(path)
    return digest("gguf", os.path.abspath(path), st.st_size, st.st_mtime_ns, _versions(), dtype)


def cached_gguf_folder(path: str, dtype: str) -> Path | None:
    """The cached float copy of a GGUF model, if there is one (and caching is on)."""
    root = cache_root()
    if root is None:
        return None
    folder = root / "models" / gguf_key(path, dtype)
    return folder if (folder / "peftlab-cache.json").is_file() else None


def store_gguf_copy(path: str, dtype: str, model, tokenizer) -> Path | None:
    """Save ``model`` and ``tokenizer`` (loaded from the GGUF at ``path``) as the cache entry; a
    failure to write (read-only home, full disk) only costs the next cell the slow load."""
    root = cache_root()
    if root is None:
        return None
    folder = root / "models" / gguf_key(path, dtype)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
        _save_float(model, tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "peftlab-cache.json").write_text(json.dumps({"gguf": os.path.abspath(path), "dtype": dtype,
                                                              "versions": _versions()}, indent=1))
        try:
            tmp.rename(folder)
        except OSError:  # another process stored it first
            shutil.rmtree(tmp, ignore_errors=True)
        return folder
    except OSError:
        return None


def _save_float(model, folder: Path) -> None:
    """``save_pretrained`` of a model transformers dequantized from GGUF: it is float already, but
    still carries the GGUF "quantization" marks, which make transformers refuse to save it. They
    are lifted for the save (so the copy loads as the plain float model it is) and put back."""
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(model.config, "quantization_config", None)
    try:
        model.hf_quantizer = None
        if config is not None:
            del model.config.quantization_config
        model.save_pretrained(folder)
    finally:
        model.hf_quantizer = quantizer
        if config is not None:
            model.config.quantization_config = config


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return digest(text, getattr(tokenizer, "chat_template", None), tokenizer.eos_token, tokenizer.pad_token,
                  type(tokenizer).__name__)


def encode_cached(rows, tokenizer, max_length: int, encode):
    """``encode(rows, tokenizer, max_length)``, read from the cache when the same tokenizer, rows
    and length were encoded before."""
    import torch

    root = cache_root()
    if root is None:
        return encode(rows, tokenizer, max_length)
    key = digest("tokens", PROMPT_FORMAT, tokenizer_fingerprint(tokenizer), max_length,
                 [(r.instruction, r.context, r.response) for r in rows])
    path = root / "tokens" / f"{key}.pt"
    if path.is_file():
        try:
            return _unpack(torch.load(path, weights_only=True))
        except Exception:  # a damaged entry is rebuilt
            pass
    out = encode(rows, tokenizer, max_length)
    try:
        with atomic_path(path) as tmp:
            torch.save(_pack(out), tmp)
    except OSError:
        pass
    return out


def _pack(enc) -> dict[str, Any]:
    """Tensors and integers only, so reading needs no pickle (``weights_only``)."""
    import torch

    lengths = [len(ids) for ids, _ in enc.examples]
    return {"ids": torch.tensor([t for ids, _ in enc.examples for t in ids], dtype=torch.int64),
            "labels": torch.tensor([t for _, lab in enc.examples for t in lab], dtype=torch.int64),
            "lengths": torch.tensor(lengths, dtype=torch.int64), "dropped": enc.dropped, "truncated": enc.truncated}


def _unpack(d: dict[str, Any]):
    from peftlab.data.prompts import Encoded

    ids, labels, out, at = d["ids"].tolist(), d["labels"].tolist(), [], 0
    for n in d["lengths"].tolist():
        out.append((ids[at: at + n], labels[at: at + n]))
        at += n
    return Encoded(out, dropped=d["dropped"], truncated=d["truncated"])


def size_bytes() -> int:
    """Bytes the cache folder holds (0 when it is off or absent)."""
    root = cache_root()
    if root is None or not root.exists():
        return 0
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def clear() -> int:
    """Delete the cache folder; returns the bytes freed."""
    root, size = cache_root(), size_bytes()
    if root is not None and root.exists():
        shutil.rmtree(root)
    return size
