"""README.md stays true: its test command is CI's, its troubleshooting quotes what the program prints, and
every option it mentions exists."""

from __future__ import annotations

import re
from pathlib import Path

import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PRODUCT = [path for path in ROOT.glob("*.py")]


def section(title: str) -> str:
    start = README.index(title)
    following = re.search(r"^#{2,3} ", README[start + len(title) :], flags=re.MULTILINE)
    return README[start : start + len(title) + (following.start() if following else len(README))]


def source_texts() -> str:
    """Our product code, plus tmrl's client (whose own words the table quotes once, and says so)."""
    texts = [path.read_text(encoding="utf-8") for path in PRODUCT]
    try:
        import importlib.util

        spec = importlib.util.find_spec("tmrl")
        if spec is not None and spec.origin:
            tools = Path(spec.origin).parent / "custom" / "tm" / "utils" / "tools.py"
            texts.append(tools.read_text(encoding="utf-8"))
    except (ImportError, OSError):
        pass
    return "\n".join(texts)


def test_every_troubleshooting_message_is_quoted_as_the_program_prints_it():
    table = section("### Troubleshooting")
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) >= 12, "the troubleshooting table lost its rows"
    sources = source_texts()
    for row in rows:
        first_column = row.split(" | ")[0]
        for quoted in re.findall(r"`([^`]+)`", first_column):
            fragment = quoted.removeprefix("RED FLAG ")  # printed as "RED FLAG <name>: ..."
            assert fragment in sources, f"README quotes {quoted!r}, which the program never prints"


def test_every_env_tm_option_the_readme_names_exists():
    names = set(cli.build_parser()._option_string_actions)
    lines = [line for line in README.splitlines() if "env_tm.py" in line]
    assert len(lines) > 20
    for line in lines:
        for option in re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", line.split("#")[0]):
            assert option in names, f"README shows env_tm.py with {option}, which it does not have: {line}"


def test_the_test_command_is_the_one_ci_runs():
    marker = README.index("<!-- test-command -->")
    block = README[marker:].split("```")[1].strip()
    assert block.endswith("python -m pytest -q") and "pip install --no-deps tmrl==0.7.1" in block
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "<!-- test-command -->" in ci, "CI reads the test command from README's marker"
