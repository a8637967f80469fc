"""`python -m bench.gpu.bundle DIR` (what `make device-bundle` runs): the packages the device run needs beyond
Python 3.12 and torch, as plain files in DIR/site, to be carried to a GPU machine that has nothing else and no
network.

What it holds: PyYAML (configs) and pytest with its dependencies for Python 3.12 on Linux (pluggy, iniconfig,
packaging, pygments). Each is downloaded as a wheel for CPython 3.12 x86-64 (`pip download --only-binary=:all:
--no-deps`, pinned versions) and unzipped into DIR/site, which goes first on PYTHONPATH: no installer is needed
there. PyYAML's wheel also carries its libyaml extension (a compiled module); it is left out, so PyYAML runs its
own pure-Python parser (its documented fallback, fast enough for config files), the same code on the GPU machine
and on the Python 3.11 of CI's device-environment test, and the bundle keeps a margin under its size limit. A
manifest (DIR/site/device_bundle.json) lists what is there; a second call with the same pins does nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

# pytest's own requirements for CPython 3.12 on Linux are exactly the four below it (checked at build time).
PINS = {"pytest": "9.2.0", "pluggy": "1.7.0", "iniconfig": "2.3.1", "packaging": "26.4", "pygments": "2.21.0",
        "PyYAML": "6.0.4"}
TARGET = {"python_version": "3.12", "python_full_version": "3.12.0", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
          "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
LIMIT_BYTES = 10 * 2**20
MANIFEST = "device_bundle.json"
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "build" / "device_bundle"  # git-ignored (/build/)


def _normal(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _download(wheels: Path) -> list[Path]:
    if wheels.exists():
        shutil.rmtree(wheels)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", TARGET["python_version"], "--implementation", "cp", *platforms, "--dest", str(wheels),
           *(f"{name}=={version}" for name, version in PINS.items())]
    print("device bundle: " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    found = sorted(wheels.glob("*.whl"))
    if len(found) != len(PINS):
        raise SystemExit(f"device bundle: expected {len(PINS)} wheels, pip gave {[w.name for w in found]}")
    return found


def _requirements(site: Path) -> dict[str, list[str]]:
    """Every bundled distribution's requirements that apply on the target (Python 3.12, Linux)."""
    from packaging.requirements import Requirement

    needs = {}
    for metadata in site.glob("*.dist-info/METADATA"):
        lines = metadata.read_text(encoding="utf-8").splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Name:"))
        reqs = [Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")]
        needs[_normal(name)] = [_normal(r.name) for r in reqs if r.marker is None or r.marker.evaluate(TARGET)]
    return needs


def _check(site: Path) -> int:
    needs = _requirements(site)
    missing = {f"{name} needs {dep}" for name, deps in needs.items() for dep in deps if dep not in needs}
    if missing:
        raise SystemExit(f"device bundle: a requirement is not bundled: {', '.join(sorted(missing))}")
    size = sum(f.stat().st_size for f in site.rglob("*") if f.is_file())
    if size > LIMIT_BYTES:
        raise SystemExit(f"device bundle: {size / 2**20:.1f} MiB is over the {LIMIT_BYTES / 2**20:.0f} MiB limit")
    return size


def build(out: Path) -> Path:
    """DIR/site with every pinned package unpacked (rebuilt only when the pins changed); returns DIR/site."""
    site = out / "site"
    manifest = site / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()).get("pins") == PINS:
        print(f"device bundle: {site} is up to date", flush=True)
        return site
    wheels = _download(out / "wheels")
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
    for compiled in site.rglob("*.so"):  # PyYAML's optional libyaml binding (see above)
        compiled.unlink()
    size = _check(site)
    manifest.write_text(json.dumps({"pins": PINS, "wheels": [w.name for w in wheels], "bytes": size}, indent=2))
    print(f"device bundle: {len(wheels)} packages, {size / 2**20:.1f} MiB in {site} (carry it; PYTHONPATH={site})",
          flush=True)
    return site


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu.bundle", description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, nargs="?", default=DEFAULT_DIR,
                    help="the bundle's folder (git-ignored); DIR/site is what travels")
    build(ap.parse_args(argv).out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
