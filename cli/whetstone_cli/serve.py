"""`whetstone serve`: the Tinker-compatible training service for one base model, here.

    whetstone serve --base-model whetstone://tiny [--host 127.0.0.1] [--port 8000]
                    [--api-keys-file FILE] [--checkpoint-dir DIR] [--model-name NAME]

Point the official client at it: `tinker.ServiceClient(base_url="http://127.0.0.1:8000")` with
TINKER_API_KEY set to one of the keys (they must start with `tml-`, the client checks). Keys come from
--api-keys-file (one per line; a Kubernetes Secret mounted as a file), else WHETSTONE_API_KEYS
(comma-separated); with neither, any key is accepted and each key is its own tenant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

ENV_API_KEYS = "WHETSTONE_API_KEYS"
KEY_PREFIX = "tml-"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the Tinker-compatible training service for one base model")
    p.add_argument(
        "--base-model", required=True, help="model URI: whetstone://tiny, a folder, pvc://, hf://..."
    )
    p.add_argument(
        "--model-name",
        default=None,
        help="the name clients use for it (default: the URI); e.g. Qwen/Qwen3-8B for cookbook recipes "
        "serving whetstone://tiny-qwen3",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-keys-file", type=Path, default=None, help="file with one API key per line")
    p.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        help="where saved states go (default ~/.cache/whetstone/service)",
    )
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--max-training-clients", type=int, default=4, help="per session (default 4)")
    p.add_argument("--max-sampler-snapshots", type=int, default=16, help="ephemeral snapshots kept per key")
    p.add_argument("--max-request-mb", type=int, default=64, help="largest request body (default 64 MiB)")
    p.add_argument(
        "--idle-timeout-seconds",
        type=float,
        default=1800.0,
        help="release a session's clients after this long without requests (checkpoints stay)",
    )
    p.set_defaults(func=main)


def read_keys(file: Path | None) -> list[str]:
    """Keys from the file, else from WHETSTONE_API_KEYS; each must start with tml- (the client's rule)."""
    if file is not None:
        try:
            text = file.read_text()
        except OSError as e:
            raise SystemExit(f"--api-keys-file {file}: {e.strerror or e}") from None
        keys = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        source = str(file)
    else:
        keys = [k.strip() for k in os.environ.get(ENV_API_KEYS, "").split(",") if k.strip()]
        source = ENV_API_KEYS
    bad = [i for i, k in enumerate(keys, 1) if not k.startswith(KEY_PREFIX)]
    if bad:
        raise SystemExit(
            f"{source}: key #{bad[0]} does not start with {KEY_PREFIX!r} "
            "(the tinker client refuses such keys)"
        )
    return keys


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keys = read_keys(args.api_keys_file)
    from whetstone_trainer.models.sources import ModelSourceError
    from whetstone_trainer.service.app import Keys, serve
    from whetstone_trainer.service.checkpoints import CheckpointStore
    from whetstone_trainer.service.engine import Engine
    from whetstone_trainer.service.operations import Limits, TrainingService, checkpoint_dir_default

    try:
        engine = Engine(args.base_model, device=args.device)
    except ModelSourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    limits = Limits(
        max_training_clients=args.max_training_clients,
        max_sampler_snapshots=args.max_sampler_snapshots,
        max_request_bytes=args.max_request_mb << 20,
        idle_timeout_seconds=args.idle_timeout_seconds,
    )
    store = CheckpointStore(args.checkpoint_dir or checkpoint_dir_default())
    service = TrainingService(engine, store, args.model_name or args.base_model, limits)
    serve(service, Keys(keys), args.host, args.port)
    return 0
