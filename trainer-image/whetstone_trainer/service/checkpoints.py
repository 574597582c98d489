"""Saved states and sampler weights of the training service, on disk, one folder per API key.

    <root>/<tenant>/<training run>/run.json                      the run: base model, LoRA shape, metadata
    <root>/<tenant>/<training run>/weights/<name>/               save_state: weights + AdamW state
    <root>/<tenant>/<training run>/sampler_weights/<name>/       save_weights_for_sampler(name): weights only

`tenant` is a digest of the API key, so one key never lists, reads or deletes another's files, and the
folders survive the session (and the service): an idle session is released, its checkpoints stay. Each
checkpoint folder is written under a temporary name and renamed into place, so a reader never sees half.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .protocol import NotFound, TinkerPath, UserError

WEIGHTS_FILE = "weights.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
META_FILE = "checkpoint.json"
RUN_FILE = "run.json"
TYPE_OF_KIND = {"weights": "training", "sampler_weights": "sampler"}


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


class CheckpointStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _run_dir(self, tenant: str, run_id: str) -> Path:
        if "/" in run_id or run_id in ("", ".", ".."):
            raise NotFound(run_id)
        return self.root / tenant / run_id

    def folder(self, tenant: str, path: TinkerPath) -> Path:
        return self._run_dir(tenant, path.run_id) / path.kind / path.name

    # --- runs --------

    def write_run(self, tenant: str, run_id: str, run: dict[str, Any]) -> None:
        folder = self._run_dir(tenant, run_id)
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(folder / RUN_FILE, run)

    def read_run(self, tenant: str, run_id: str) -> dict[str, Any]:
        file = self._run_dir(tenant, run_id) / RUN_FILE
        if not file.is_file():
            raise NotFound(f"training run {run_id!r}")
        return json.loads(file.read_text())

    def runs(self, tenant: str) -> list[str]:
        folder = self.root / tenant
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if (p / RUN_FILE).is_file())

    # --- checkpoints --------

    def save(
        self,
        tenant: str,
        path: TinkerPath,
        weights: dict[str, torch.Tensor],
        optimizer: dict[str, Any] | None,
        meta: dict[str, Any],
        overwrite: bool,
    ) -> dict[str, Any]:
        final = self.folder(tenant, path)
        if final.exists() and not overwrite:
            raise UserError(f"{path} already exists; save under another name (or pass overwrite)")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=final.parent))
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS_FILE))
            if optimizer is not None:
                torch.save(optimizer, tmp / OPTIMIZER_FILE)
            size = sum(f.stat().st_size for f in tmp.iterdir())
            ttl = meta.get("ttl_seconds")
            record = {
                **meta,
                "checkpoint_id": path.checkpoint_id,
                "checkpoint_type": TYPE_OF_KIND[path.kind],
                "tinker_path": str(path),
                "time": now_iso(),
                "size_bytes": size,
                "expires_at": (datetime.now(UTC) + timedelta(seconds=int(ttl))).isoformat() if ttl else None,
            }
            _write_json(tmp / META_FILE, record)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return record

    def meta(self, tenant: str, path: TinkerPath) -> dict[str, Any]:
        file = self.folder(tenant, path) / META_FILE
        if not file.is_file():
            raise NotFound(str(path))
        return json.loads(file.read_text())

    def load(
        self, tenant: str, path: TinkerPath, optimizer: bool
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any] | None]:
        meta = self.meta(tenant, path)
        folder = self.folder(tenant, path)
        weights = load_file(str(folder / WEIGHTS_FILE))
        opt = None
        if optimizer:
            if not (folder / OPTIMIZER_FILE).is_file():
                raise UserError(f"{path} holds no optimizer state (sampler weights are weights only)")
            opt = torch.load(folder / OPTIMIZER_FILE, weights_only=True)
        return meta, weights, opt

    def list(self, tenant: str, run_id: str) -> list[dict[str, Any]]:
        run = self._run_dir(tenant, run_id)
        out = []
        for kind in TYPE_OF_KIND:
            folder = run / kind
            if folder.is_dir():
                for item in sorted(folder.iterdir()):
                    if (item / META_FILE).is_file() and not item.name.startswith("."):
                        out.append(json.loads((item / META_FILE).read_text()))
        return sorted(out, key=lambda c: c["time"])

    def delete(self, tenant: str, path: TinkerPath) -> None:
        folder = self.folder(tenant, path)
        if not (folder / META_FILE).is_file():
            raise NotFound(str(path))
        shutil.rmtree(folder)

    def everything(self, limit: int) -> list[dict[str, Any]]:
        """Every checkpoint of every tenant (newest first, at most `limit`), for the service's /status."""
        found = []
        for meta in self.root.glob(f"*/*/*/*/{META_FILE}"):
            try:
                record = json.loads(meta.read_text())
            except (OSError, ValueError):
                continue
            record["folder"] = str(meta.parent)
            found.append(record)
        found.sort(key=lambda c: c.get("time", ""), reverse=True)
        return found[:limit]


def public_checkpoint(record: dict[str, Any]) -> dict[str, Any]:
    """A stored record as the client's `Checkpoint`."""
    keys = ("checkpoint_id", "checkpoint_type", "time", "tinker_path", "size_bytes", "expires_at")
    out = {k: record.get(k) for k in keys}
    out["public"] = False
    meta = record.get("user_metadata")
    out["user_metadata"] = {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else None
    return out


def _write_json(file: Path, data: dict[str, Any]) -> None:
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, file)
