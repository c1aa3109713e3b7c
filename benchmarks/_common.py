"""What every JAX benchmark script records about where it ran, and how it writes its JSON."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import jax


def environment() -> dict[str, Any]:
    """Date, host and JAX backend/device of this run (the keys every result JSON starts with)."""
    return {"date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
            "host": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "jax_backend": jax.default_backend(), "jax_device": str(jax.devices()[0].device_kind),
            "jax": jax.__version__}


def write_result(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``result`` as indented JSON to ``path`` (parents created) and say so on stdout."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return out
