"""What every benchmark shares: the machine's description and where results go."""

from __future__ import annotations

import json
import os
import platform
import re
from datetime import datetime
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """The machine a result was measured on, in words and numbers."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        mem = Path("/proc/meminfo").read_text().split("\n", 1)[0]
        info["memory_gib"] = round(int(re.findall(r"\d+", mem)[0]) / 2**20, 1)
    except (OSError, IndexError):
        pass
    return info


def machine_label(info: dict) -> str:
    gpu = f", {info['gpu']}" if info.get("gpu") else ""
    return f"{info['cpu']}, {info['cores']} cores, {info.get('memory_gib', '?')} GiB{gpu}"


def save(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    """Write ``payload`` as JSON named by benchmark, machine and date."""
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{payload['machine']['cpu']}-{payload['machine']['cores']}c").strip("-")
    path = out_dir / f"{name}-{slug}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A Markdown table of ``rows`` with (key, header) columns; floats get 3 significant digits."""

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "-" if v is None else str(v)

    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])
