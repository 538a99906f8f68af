"""What a scanner console installs to serve: `pip install '.[serve]'` into a fresh virtual environment,
the size of everything it put there, and that neither torch nor ray came with it (target: at most
300 MB). Packages come from the package index as a new machine would get them.

    .venv/bin/python benchmarks/install_size.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_MB = 300
FORBIDDEN = ("torch", "torchvision", "ray", "albumentations", "timm")


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20


def measure() -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="verity-serve-install-") as work:
        venv = Path(work) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-cache-dir"]
        subprocess.run([*pip, f"{ROOT}[serve]"], check=True)
        listed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
                                check=True, capture_output=True, text=True).stdout  # fmt: skip
        names = sorted(package["name"].lower() for package in json.loads(listed))
        site = next((venv / "lib").glob("python3*/site-packages"))
        pip_own = sum(folder_mb(p) for p in site.glob("pip*"))  # the installer, not what serving needs
        size = folder_mb(site) - pip_own
    return {"site_packages_mb": round(size, 1), "packages": len(names),
            "forbidden_present": [name for name in names if name in FORBIDDEN],
            "meets": size <= TARGET_MB and not any(name in FORBIDDEN for name in names)}  # fmt: skip


def main() -> None:
    figures = measure()
    print(json.dumps(figures, indent=2))
    print(f"serve-only install: {figures['site_packages_mb']} MB in {figures['packages']} packages "
          f"(target <= {TARGET_MB} MB; torch, ray and the training stack absent: "
          f"{not figures['forbidden_present']})")  # fmt: skip


if __name__ == "__main__":
    main()
