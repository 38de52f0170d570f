"""Create the peers' virtual environments: ``.cache/peers/transformers/`` and ``.cache/peers/kvpress/``.

keepkv is compared with Hugging Face ``transformers`` (``generate()`` on the same GGUF weights) and NVIDIA's
``kvpress`` (the same budgets, query-agnostic compression). Neither may enter keepkv's own environment
(``keepkv/`` never imports them, and kvpress pins ``transformers<5.3``), so each lives in its own venv:

- ``transformers``: torch 2.13.0 (CPU) + transformers + accelerate + gguf (GGUF loading dequantizes to fp32);
- ``kvpress``: torch 2.13.0 (CPU) + kvpress + the newest transformers it allows + accelerate + gguf.

Order matters: ``torch==2.13.0`` is installed FIRST (the CPU wheel found through pip's find-links), then the
peer packages; before the real install a ``pip install --dry-run --report`` must show that pip would not fetch
another torch (a CUDA build is several GB) — if it would, the script stops. Idempotent: a venv whose
``pip freeze`` already satisfies the pins is left alone. Prints every step.

Usage (any Python >= 3.10; the venvs use that Python's base interpreter)::

    python tools/peers/setup.py                # both venvs
    python tools/peers/setup.py --only kvpress
    python tools/peers/setup.py --check        # report what is there, install nothing
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PEERS_DIR = ROOT / ".cache" / "peers"
TORCH = "torch==2.13.0"

# Versions verified on this project (CPU, Python 3.11, torch 2.13.0 CPU). kvpress 0.5.5 requires
# transformers>=4.56,<5.3; 5.2.0 is the newest it allows.
PINS: dict[str, list[str]] = {
    "transformers": ["transformers==5.24.0", "accelerate==1.15.0", "gguf==0.19.0"],
    "kvpress": ["kvpress==0.5.5", "transformers==5.2.0", "accelerate==1.15.0", "gguf==0.19.0"],
}


def venv_python(name: str) -> Path:
    """The interpreter of peer venv ``name`` (``.cache/peers/<name>/bin/python``)."""
    return PEERS_DIR / name / "bin" / "python"


def run(cmd: list[str], capture: bool = False) -> subprocess.CompletedProcess:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, text=True, capture_output=capture)


def installed(name: str) -> dict[str, str]:
    """``{lowercase distribution name: version}`` installed in venv ``name`` (empty if no venv)."""
    py = venv_python(name)
    if not py.exists():
        return {}
    out = subprocess.run([str(py), "-m", "pip", "list", "--format=json"], check=True, text=True,
                         capture_output=True).stdout
    return {row["name"].lower(): row["version"] for row in json.loads(out)}


def satisfied(name: str) -> bool:
    have = installed(name)
    for pin in [TORCH, *PINS[name]]:
        dist, version = pin.split("==")
        got = have.get(dist.lower(), "")
        if got.split("+")[0] != version:
            return False
    return True


def check_no_other_torch(py: Path, requirements: list[str]) -> None:
    """Dry-run the install; stop if pip would download or replace torch (a CUDA build would be several GB)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        run([py, "-m", "pip", "install", "--dry-run", "--quiet", "--report", report, *requirements])
        plan = json.loads(report.read_text())
    wanted = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in plan.get("install", [])}
    print(f"  dry run: pip would install {len(wanted)} distributions: "
          + ", ".join(f"{k}=={v}" for k, v in sorted(wanted.items())), flush=True)
    bad = [k for k in wanted if k == "torch" or k.startswith(("nvidia-", "triton"))]
    if bad:
        raise SystemExit(f"ABORT: pip wants to fetch {', '.join(f'{k}=={wanted[k]}' for k in bad)} into "
                         f"{py.parent.parent}; torch must stay {TORCH} (CPU). Nothing was installed.")


def setup_venv(name: str) -> None:
    path = PEERS_DIR / name
    if satisfied(name):
        print(f"[{name}] {path}: already has {TORCH} + {', '.join(PINS[name])}; nothing to do", flush=True)
        return
    if not venv_python(name).exists():
        print(f"[{name}] creating venv {path}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=False).create(path)
    py = venv_python(name)
    print(f"[{name}] step 1: {TORCH} first (CPU wheel)", flush=True)
    run([py, "-m", "pip", "install", "--quiet", TORCH])
    print(f"[{name}] step 2: dry run of {', '.join(PINS[name])}", flush=True)
    check_no_other_torch(py, [TORCH, *PINS[name]])
    print(f"[{name}] step 3: install", flush=True)
    run([py, "-m", "pip", "install", "--quiet", TORCH, *PINS[name]])
    have = installed(name)
    print(f"[{name}] done: torch {have.get('torch')}, transformers {have.get('transformers')}"
          + (f", kvpress {have.get('kvpress')}" if "kvpress" in have else ""), flush=True)
    if not satisfied(name):
        raise SystemExit(f"[{name}] pins not satisfied after install: {have}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(PINS), action="append",
                        help="set up only this venv (repeatable); default: all")
    parser.add_argument("--check", action="store_true", help="only report whether each venv satisfies its pins")
    args = parser.parse_args(argv)
    names = args.only or sorted(PINS)
    if args.check:
        ok = True
        for name in names:
            good = satisfied(name)
            ok &= good
            print(f"[{name}] {PEERS_DIR / name}: {'ok' if good else 'missing or different versions'}")
        return 0 if ok else 1
    for name in names:
        setup_venv(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
