"""``python -m peftlab.sweep.migrate FOLDER...``: add to records made before architecture v2 the
fields every record now carries, recomputed by today's code (nothing is guessed):

- ``adapter.trains_base``, ``adapter.size_setting``, ``adapter.size``: from the adapter plugin's
  declarations, built with the record's own settings;
- ``params.backward_blocks`` and ``params.trainable_bytes``: by attaching that adapter to the
  record's architecture on the meta device (no weights); its trainable count must equal the
  record's, or the record is left untouched and reported.

Records that already have the fields are left alone. Each rewritten record is written atomically.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from peftlab.host import PluginHost, load_host
from peftlab.sweep.store import ResultsStore

NEW = ("adapter.trains_base", "adapter.size_setting", "adapter.size", "params.backward_blocks", "params.trainable_bytes")


def migrate_record(rec: dict[str, Any], host: PluginHost) -> dict[str, Any]:
    from peftlab.adapt.attach import attach
    from peftlab.architectures import ALIASES, meta_model
    from peftlab.cell.measure import backward_blocks, trainable_bytes
    from peftlab.cell.run import adapter_fields

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
            if all(k in rec for k in NEW) or rec.get("status") == "failed":
                continue
            try:
                store.write_record(migrate_record(rec, host))
                changed += 1
            except (ValueError, KeyError) as exc:
                print(f"{folder}: {cell_id} left as it is: {exc}", file=sys.stderr)
        print(f"{folder}: {changed} record(s) given the declared fields", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
