"""The README and docs/ link only to files that exist and to headings that exist (GitHub's anchors)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchors(page):
    """GitHub's anchor of every heading: lower case, punctuation but '-' and '_' dropped, spaces to '-';
    a repeated one gets -1, -2, ..."""
    heads = re.findall(r"^#+\s+(.*?)\s*$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), re.M)
    out = set()
    for h in heads:
        a = base = re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-")
        while a in out:
            a = f"{base}-{int(a.rsplit('-', 1)[1]) + 1 if a != base else 1}"
        out.add(a)
    return out


def test_every_link_names_a_file_and_a_heading_that_exist():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue                                          # the web: not checked here
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.name}: {target} (no file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.name}: {target} (no heading)")
    assert not broken, "\n".join(broken)
