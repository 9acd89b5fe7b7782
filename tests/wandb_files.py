"""Reading an offline wandb run's files, to test what a user would see in the dashboard."""

from __future__ import annotations

import json
from pathlib import Path


def wandb_records(path: Path):
    """The protobuf records of an offline run's ``run-*.wandb`` file (wandb's LevelDB-style log:
    a 7-byte file header, then 32 KiB blocks of chunks, each with a 7-byte header of CRC,
    length and type: full, first, middle or last piece of a record)."""
    from wandb.proto import wandb_internal_pb2

    data, block, position, pending = path.read_bytes(), 32768, 7, b""
    while position + 7 <= len(data):
        room = block - position % block
        if room < 7:  # the rest of a block too short for a header is padding
            position += room
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def history(run: Path) -> list[dict[str, object]]:
    """Every ``log`` call of an offline run (``offline-run-*`` folder), as ``{key: value}``."""
    rows = []
    for record in wandb_records(next(run.glob("run-*.wandb"))):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows


def run_record(run: Path):
    """The run's metadata record (group, tags, display name, config)."""
    return next(r.run for r in wandb_records(next(run.glob("run-*.wandb"))) if r.WhichOneof("record_type") == "run")


def config(run: Path) -> dict[str, object]:
    """The run's config as logged (every config record merged)."""
    merged: dict[str, object] = {}
    for record in wandb_records(next(run.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        items = record.config.update if kind == "config" else record.run.config.update if kind == "run" else []
        for item in items:
            merged[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return merged


def summary(run: Path) -> dict[str, object]:
    """The run's summary as last updated (``wandb.run.summary``)."""
    merged: dict[str, object] = {}
    for record in wandb_records(next(run.glob("run-*.wandb"))):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                merged[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return merged
