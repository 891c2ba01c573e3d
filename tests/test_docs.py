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


def _leaves(node: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in node.items():
        out |= _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return out


def _documented(section: str) -> set[str]:
    """The keys named in the first column of a section's table in docs/configuration.md."""
    text = (ROOT / "docs" / "configuration.md").read_text().split(f"### {section}")[1].split("\n### ")[0]
    keys = set()
    for line in text.splitlines():
        if line.startswith("| `"):
            keys |= set(re.findall(r"`([^`]+)`", line.split(" | ")[0]))
    return keys


@pytest.mark.parametrize(
    ("section", "config", "variants"),
    [
        ("Training", "train", [[], ["model/pos_encoding=rope"]]),
        ("Sampling", "sample", [["ckpt_path=x"]]),
        ("Evaluating", "evaluate", [["ckpt_path=x"]]),
    ],
)
def test_the_configuration_reference_names_every_key(section, config, variants):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    keys = set()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for overrides in variants:
            keys |= _leaves(OmegaConf.to_container(compose(config, overrides=overrides), resolve=False))
    keys = {k for k in keys if not k.endswith("_target_")}
    documented = _documented(section)
    assert keys - documented == set(), f"keys missing from docs/configuration.md ({section})"
    assert documented - keys == set(), f"docs/configuration.md names keys the config lacks ({section})"


def test_every_comparison_with_nanogpt_says_how_each_measures_val_loss():
    """nanoGPT averages random batches of the val split, shakegpt passes over all of it: wherever a
    page quotes one of nanoGPT's val losses, the same section says so."""
    quoted = 0
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for section in re.split(r"\n(?=#)", page.read_text()):
            if "1.4697" in section or "1.8857" in section:
                quoted += 1
                text = " ".join(section.split())
                assert "random batches" in text and "whole validation split" in text, (page.name, section[:80])
    assert quoted >= 5
