"""README.md's code blocks for the tests that run them (marked `<!-- test: NAME -->`)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippet(name: str) -> str:
    """The ```python block right after `<!-- test: NAME -->` in README.md (exactly one)."""
    blocks = re.findall(rf"<!-- test: {re.escape(name)} -->\s*```python\n(.*?)^```", README.read_text(), re.S | re.M)
    assert len(blocks) == 1, f"README.md needs exactly one python block marked <!-- test: {name} -->"
    return blocks[0]
