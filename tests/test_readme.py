"""The README's two set-up commands are exactly what CI runs."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_commands_are_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    setup = readme.split("## Set-up: two commands", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", setup, flags=re.S)
    assert len(commands) == 2, commands
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    for command in commands:
        assert command.strip() in ci_lines, f"README command not run verbatim by .ci/run: {command}"


def test_every_row_of_the_bad_input_table_names_existing_tests():
    table = (REPO / "docs" / "bad_inputs.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "::" in line]
    assert len(rows) >= 30, len(rows)
    for row in rows:
        current = None
        for file, name in re.findall(r"`(test_\w+\.py)?::(test_\w+)`", row):
            current = file or current
            assert current, row
            source = (REPO / "tests" / current).read_text()
            assert re.search(rf"^def {name}\(", source, flags=re.M), f"{current}::{name} (in docs/bad_inputs.md)"
