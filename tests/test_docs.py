"""Keep the plugin docs honest: every hook is documented with its exact signature, and tested."""

import inspect
import re
from pathlib import Path

import pytest

from difftool.plugins import hookspecs

ROOT = Path(__file__).resolve().parents[1]
HOOKS = [name for name, fn in vars(hookspecs).items() if inspect.isfunction(fn) and name.startswith("register_")]


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented_with_its_signature(hook: str) -> None:
    signature = inspect.signature(getattr(hookspecs, hook))
    heading = f"### {hook}({', '.join(signature.parameters)})"
    assert heading in (ROOT / "docs" / "plugins.md").read_text()
    assert getattr(hookspecs, hook).__doc__.strip()


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_test(hook: str) -> None:
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py") if p.name != "test_docs.py")
    assert re.search(rf"def {hook}\(", tests), f"no test implements the {hook} hook"


def test_readme_starts_with_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1).strip().splitlines()
    assert len(block) == 2 and "difftool run superres" in block[0] and "pytest" in block[1]
    # .ci/run takes the second line after the README's first ```bash fence and runs it.
    ci = (ROOT / ".ci" / "run").read_text()
    assert "sed -n '/^```bash$/{n;n;p;q}' README.md" in ci and 'bash -euo pipefail -c "$test_command"' in ci
    lines = text.splitlines()
    assert lines[lines.index("```bash") + 2] == block[1]
