"""README.md's "Supported architectures and types" section is what scripts/support_table.py
generates from runtime.models.ARCHITECTURES and quant.formats.FORMATS (rerun it after
adding either)."""

from __future__ import annotations

from conftest import REPO, load_script

from quant.formats import FORMATS
from runtime.models import ARCHITECTURES


def test_readme_support_section_is_current():
    script = load_script("support_table")
    readme = (REPO / "README.md").read_text()
    assert script.BEGIN in readme, "run: python scripts/support_table.py"
    assert script.updated(readme) == readme, "README is stale: python scripts/support_table.py"


def test_section_names_every_architecture_and_type():
    text = load_script("support_table").section()
    assert all(f"| `{arch}` |" in text for arch in ARCHITECTURES)
    assert all(f"| {fmt.name} |" in text for fmt in FORMATS.values())
