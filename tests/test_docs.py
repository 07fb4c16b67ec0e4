"""Every ```python block in docs/ runs, in order, one namespace per page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def test_there_are_examples() -> None:
    assert sum(len(BLOCK.findall(p.read_text())) for p in PAGES) >= 10


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_examples_run(
    page: Path,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    text = page.read_text()
    if "DATABASE_URL" in text:  # its examples run against a throw-away PostgreSQL
        server = request.getfixturevalue("postgres_server")
        schema = f"docs_{page.stem.replace('-', '_')}"
        monkeypatch.setenv("DATABASE_URL", f"{server.url()}?schema={schema}")
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    for i, code in enumerate(BLOCK.findall(text)):
        exec(compile(code, f"{page.name}[{i}]", "exec"), namespace)


ROOT = DOCS.parent


def test_the_readme_starts_with_the_two_commands_and_ci_runs_the_second() -> None:
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"^```bash\n(.*?)^```", readme, re.S | re.M)
    assert first_block is not None and readme.index("```bash") < 20
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert commands == ["scripts/demo", "scripts/test"]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "scripts/test" in ci


def test_the_readme_names_every_part_and_every_compat_module() -> None:
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:30]).lower()
    for part in ("pipelines", "task queues", "dispatcher", "channels"):
        assert part in first_screen
    compat = sorted(
        p.stem if p.is_file() else p.name
        for p in (ROOT / "src" / "conveyor" / "compat").iterdir()
        if not p.name.startswith("_")
    )
    assert compat == ["ate_dispatcher", "chihuo", "jobq", "os_m3_engine", "pymulproc"]
    for name in compat:
        assert f"conveyor.compat.{name}" in first_screen
