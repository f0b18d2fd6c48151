"""Every pointer into docs/ from code, configs and the README names a file and a heading that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"docs/([\w.-]+\.md)(?:#([\w-]+))?")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {github_anchor(line.lstrip("#")) for line in path.read_text().splitlines() if line.startswith("#")}


def sources() -> list[Path]:
    files = [ROOT / "README.md", *ROOT.glob("docs/*.md")]
    for folder in ("lit_rlhf", "tests", "benchmarks", "configs"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".yaml", ".md")]
    return files


def test_docs_links_resolve():
    broken = []
    for path in sources():
        for line_number, line in enumerate(path.read_text().splitlines(), start=1):
            for doc, anchor in LINK.findall(line):
                target = ROOT / "docs" / doc
                if not target.is_file() or (anchor and anchor not in anchors(target)):
                    broken.append(f"{path.relative_to(ROOT)}:{line_number}: docs/{doc}#{anchor}")
    assert not broken, "\n".join(broken)


def test_the_anchor_rule_matches_github():
    assert github_anchor(" Pad token distinct from EOS") == "pad-token-distinct-from-eos"
    assert github_anchor("T7 reward-model losses") == "t7-reward-model-losses"
