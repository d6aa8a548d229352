"""Links in the docs lead somewhere: relative links and repository paths name existing files."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# Top-level directories whose files the docs name as `dir/.../file.ext`.
TREES = ("agents", "broker", "common", "certs", "ops", "tests", "deploy", "bench", "docs")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_PATH = re.compile(rf"(?<![\w/.-])((?:{'|'.join(TREES)})/[\w./-]*\w\.(?:py|md|toml|sh|service))")


def _broken_links(doc: Path) -> list[str]:
    label = doc.relative_to(ROOT) if doc.is_relative_to(ROOT) else doc.name
    broken = []
    text = doc.read_text()
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor in the same page
        path = target.split("#", 1)[0]
        if path and not (doc.parent / path).exists():
            broken.append(f"{label}: link to {target}")
    for path in _PATH.findall(text):
        if not (ROOT / path).exists():
            broken.append(f"{label}: names {path}")
    return broken


def test_link_checker_sees_a_missing_file(tmp_path: Path) -> None:
    """A link to a missing file and a missing repository path are both reported."""
    probe = tmp_path / "probe.md"
    (tmp_path / "there.md").write_text("")
    probe.write_text("[gone](nowhere.md) and `broker/admin.py` and [ok](there.md)")
    assert _broken_links(probe) == [
        "probe.md: link to nowhere.md",
        "probe.md: names broker/admin.py",
    ]


def test_doc_links_point_at_existing_files() -> None:
    """Every relative link and every repository path in README.md and docs/ exists."""
    broken = [line for doc in DOCS for line in _broken_links(doc)]
    assert broken == [], "broken links:\n" + "\n".join(broken)
