"""Read an offline W&B run (``wandb/offline-run-*/run-*.wandb``) without syncing it.

The ``.wandb`` file is a LevelDB-style log: a 7-byte header (``:W&B``, magic, version), then
32 KiB blocks of records, each ``crc32 (4) | length (2) | type (1) | payload``, where a
payload may be split over blocks (types FULL=1, FIRST=2, MIDDLE=3, LAST=4). Joined payloads
are ``wandb_internal_pb2.Record`` protobufs. ``history`` returns the logged rows, so tests and
notebooks can check what a run sent to W&B.

    from saffu_lab.wandb_offline import history
    rows = history("logs/train/runs/<run>/wandb/latest-run")
    [r["val/ppl"] for r in rows if "val/ppl" in r]
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

HEADER = struct.Struct("<4sHB")
RECORD_HEADER = struct.Struct("<IHB")
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def run_file(run_dir: str | Path) -> Path:
    """The ``.wandb`` file of an offline run folder (or of the newest one under a ``wandb/`` folder)."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return run_dir
    found = sorted(run_dir.glob("run-*.wandb")) or sorted(run_dir.glob("offline-run-*/run-*.wandb"))
    if not found:
        raise FileNotFoundError(f"no run-*.wandb file under {run_dir}")
    return found[-1]


def payloads(path: str | Path):
    """Yield the raw protobuf payloads of a ``.wandb`` log."""
    data = Path(path).read_bytes()
    ident, _magic, _version = HEADER.unpack_from(data, 0)
    if ident != b":W&B":
        raise ValueError(f"{path} is not a W&B run log")
    pos, pending = HEADER.size, b""
    while pos + RECORD_HEADER.size <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < RECORD_HEADER.size:  # block trailer: zero padding
            pos += left_in_block
            continue
        _crc, length, kind = RECORD_HEADER.unpack_from(data, pos)
        pos += RECORD_HEADER.size
        chunk = data[pos:pos + length]
        pos += length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""
        elif kind == 0 and length == 0:  # zero padding at the end of a block
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
        else:
            raise ValueError(f"{path}: unknown record type {kind} at byte {pos}")


def records(path: str | Path):
    from wandb.proto import wandb_internal_pb2

    for payload in payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def history(run_dir: str | Path) -> list[dict]:
    """Every ``wandb.log`` row of the run as a dict of decoded JSON values."""
    rows = []
    for record in records(run_file(run_dir)):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows


def tables(run_dir: str | Path, key: str) -> list[dict]:
    """The logged ``wandb.Table``s named ``key``, oldest first, as ``{"columns": [...], "data": [...]}``."""
    run_dir = run_file(run_dir).parent
    found = sorted(
        (run_dir / "files" / "media" / "table").glob(f"{key}_*.table.json"),
        key=lambda p: int(p.name[len(key) + 1:].split("_")[0]),
    )
    return [json.loads(p.read_text()) for p in found]


def run_info(run_dir: str | Path) -> dict:
    """The run's W&B settings as sent: group, tags, job type, project (from its run record)."""
    for record in records(run_file(run_dir)):
        if record.WhichOneof("record_type") == "run":
            run = record.run
            return {"group": run.run_group, "tags": list(run.tags), "job_type": run.job_type, "project": run.project}
    raise ValueError(f"no run record in {run_file(run_dir)}")
