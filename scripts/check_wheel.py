"""Build the wheel as a user's pip would and check what it publishes.

Fails if the build warns (a deprecation today is a broken build tomorrow), if the metadata
publishes a development-only set as an extra, or if ``pip install conveyor`` and
``conveyor[redis,metrics,otel,top]`` do not install from the wheel into a fresh environment.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = os.environ.get("CONSTRAINTS", str(ROOT / "constraints.txt"))
#: each extra, and a module it must make importable
PUBLISHED_EXTRAS = {
    "redis": "redis",
    "metrics": "prometheus_client",
    "otel": "opentelemetry.trace",
    "top": "rich",
    "msgpack": "msgpack",
    "cron": "cronsim",
    "postgres": "psycopg",
    "dask": "distributed",
}


def pip(python: Path | str, *args: str) -> str:
    cmd = [str(python), "-m", "pip", *args, "-c", CONSTRAINTS]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout + done.stderr


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        log = pip(
            sys.executable, "wheel", "-v", "--no-deps", "--build-constraint", CONSTRAINTS,
            "-w", str(out / "dist"), str(ROOT),
        )  # fmt: skip
        warning = re.compile(r"deprecat|\w+Warning\b", re.I)
        warned = [line for line in log.splitlines() if warning.search(line)]
        if warned:
            sys.exit("building the wheel warned:\n" + "\n".join(warned))
        (wheel,) = (out / "dist").glob("conveyor-*.whl")
        with zipfile.ZipFile(wheel) as zf:
            names = zf.namelist()
            meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
            meta = Parser().parsestr(zf.read(meta_name).decode())
        extras = set(meta.get_all("Provides-Extra") or [])
        if extras != set(PUBLISHED_EXTRAS):
            sys.exit(f"the wheel publishes extras {sorted(extras)}, not {sorted(PUBLISHED_EXTRAS)}")
        if meta.get("License-Expression") != "MIT":
            sys.exit(f"License-Expression is {meta.get('License-Expression')!r}, not 'MIT'")
        if not any(n.endswith("licenses/LICENSE") for n in names):
            sys.exit("the wheel carries no LICENSE file")
        if not any(n == "conveyor/py.typed" for n in names):
            sys.exit("the wheel carries no py.typed")
        every = ",".join(sorted(PUBLISHED_EXTRAS))
        for spec in (str(wheel), f"conveyor[{every}] @ {wheel.as_uri()}"):
            env = out / "env"
            venv.create(env, with_pip=True, clear=True)
            python = env / "bin" / "python"
            pip(python, "install", "--quiet", spec)
            subprocess.run([str(python), "-c", "import conveyor"], check=True)
            subprocess.run([str(env / "bin" / "conveyor"), "--version"], check=True)
            if "[" in spec:
                for module in PUBLISHED_EXTRAS.values():
                    subprocess.run([str(python), "-c", f"import {module}"], check=True)
    print(f"wheel ok: {wheel.name}, extras {sorted(extras)}")


if __name__ == "__main__":
    main()
