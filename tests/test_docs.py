"""The troubleshooting table in docs/: every row names a test that exists and asserts its message."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "docs" / "troubleshooting.md"


def rows() -> list[tuple[str, str]]:
    """(the 'you see' cell, the 'test' cell) of every row of every table in the page."""
    out = []
    for line in TABLE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) == 4 and cells[3].startswith("`tests/"):
            out.append((cells[0], cells[3].strip("`")))
    return out


def test_the_table_has_its_rows():
    assert len(rows()) >= 35


@pytest.mark.parametrize(("message", "test"), rows(), ids=[t.split("::")[1] + ":" + m[:40] for m, t in rows()])
def test_each_row_is_a_test_that_asserts_its_message(message, test):
    path, name = test.split("::")
    source = (ROOT / path).read_text()
    assert re.search(rf"^(?:@.*\n)*def {name}\(", source, re.M), f"{test} does not exist"
    plain = source.replace("\\", "")  # regex escapes in the tests' patterns
    fragments = [f.strip() for span in re.findall(r"`([^`]+)`", message) for f in span.split("…")]
    assert fragments, message
    for fragment in fragments:
        assert fragment in plain, f"{test} does not assert {fragment!r}"


def test_every_relative_link_in_the_readme_and_docs_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    checked = 0
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://|#|mailto:", target):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.exists(), f"{page.name} links to {target}, which does not exist"
            checked += 1
    assert checked >= 4
