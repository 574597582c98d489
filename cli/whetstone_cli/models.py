"""`whetstone models NAME --output DIR`: a bundled model as an ordinary Hugging Face folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("models", help="write a bundled model as a Hugging Face folder")
    p.add_argument("name", help="tiny, tiny-1m, tiny-10m, tiny-50m or smollm2")
    p.add_argument("--output", required=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if args.name == "smollm2":
        from whetstone_trainer.models.smollm2 import materialise_smollm2

        materialise_smollm2(out)
    else:
        from whetstone_trainer.models.tiny import build_tiny_model

        build_tiny_model(args.name, out)
    print(out)
    return 0
