"""The repository stands alone: every document that code, tests or docs point at is in it.

A checkout is all a reader (or CI) has. A comment that points at a document for a file that
lives somewhere else, or a path that climbs out of the repository, is a dead end; so is
naming a private shorthand ("the seed", "the reference") that no file here defines.
"""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# docs/<name>.md, docs/<name>.yaml, ... as written in prose, comments or links.
DOC_REFERENCE = re.compile(r"(?<![\w/.])docs/[\w./-]+\.(?:md|yaml|png)")
# Words that name things outside the repository.
OUTSIDE = (
    re.compile(r"\.\./shared\b"),
    re.compile(r"\bthe seed\b", re.I),
    re.compile(r"\bseed's\b", re.I),
    re.compile(r"\bthe reference(?:'s)?\b(?! worker)", re.I),
)


def tracked_text_files() -> list[Path]:
    names = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    files = []
    for name in names:
        path = ROOT / name
        if path.suffix in {".py", ".md", ".yaml", ".yml", ".toml", ".proto", ".html", ".cfg", ".txt"} or path.parent.name in {"scripts", ".ci"}:
            if path.is_file():
                files.append(path)
    return files


def test_every_docs_path_mentioned_exists():
    missing = []
    for path in tracked_text_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for reference in DOC_REFERENCE.findall(line):
                if not (ROOT / reference.rstrip(".")).exists():
                    missing.append(f"{path.relative_to(ROOT)}:{number}: {reference}")
    assert not missing, "references to documents that are not in the repository:\n" + "\n".join(missing)


def test_nothing_points_outside_the_repository():
    found = []
    this_file = Path(__file__).resolve()
    for path in tracked_text_files():
        if path == this_file:
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if any(pattern.search(line) for pattern in OUTSIDE):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "lines that point outside the repository:\n" + "\n".join(found)
