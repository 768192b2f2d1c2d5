"""The repository's own files: what messages point to exists, packaging metadata, ignore rules."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted((REPO / "src" / "train_pytorch_model").glob("*.py"))


def heading_slugs(markdown: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    slugs = set()
    for line in markdown.read_text().splitlines():
        if line.startswith("#") and not line.startswith("#!"):
            title = line.lstrip("#").strip().lower()
            slugs.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return slugs


def test_every_document_a_message_points_to_exists():
    """An error pointed to a README section 'Input formats' that did not exist: each docs/*.md (and #anchor), and
    each README section named in the code, must."""
    checked = 0
    readme_headings = {line.lstrip("#").strip().lower() for line in (REPO / "README.md").read_text().splitlines()
                       if line.startswith("#")}
    for source in SOURCES:
        text = source.read_text()
        for path, anchor in re.findall(r"(docs/[A-Za-z0-9_-]+\.md)(?:#([a-z0-9-]+))?", text):
            assert (REPO / path).is_file(), f"{source.name} points to {path}, which does not exist"
            assert not anchor or anchor in heading_slugs(REPO / path), f"{source.name}: {path}#{anchor}"
            checked += 1
        for section in re.findall(r"README(?:'s)? section '([^']+)'", text):
            assert section.lower() in readme_headings, f"{source.name} names README section '{section}'"
    assert checked >= 5


def test_the_license_is_an_spdx_string_with_a_setuptools_that_reads_it():
    """A TOML-table license made every install warn twice (setuptools deprecation)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"
    assert "setuptools>=77" in project["build-system"]["requires"]


def test_no_tracked_file_is_ignored():
    """.gitignore must not list files the repository ships (deploy/*.yml were reported so)."""
    ignored = subprocess.run(["git", "ls-files", "--cached", "--ignored", "--exclude-standard"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
    assert ignored == []
