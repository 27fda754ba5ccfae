"""Assemble README.md from docs/readme/intro.md, the per-stage docs and docs/readme/development.md.

Run from the repository root: python docs/readme/build_readme.py
Headings of the stage docs are demoted one level; their relative links are rebased onto docs/.
"""

import re
from pathlib import Path

PARTS = ["readme/intro.md", "preprocess.md", "train.md", "caption.md", "evaluate.md", "serve.md",
         "benchmarks.md", "synthetic_and_clip_pretrain.md", "readme/development.md"]
STAGE_DOCS = set(PARTS[1:-1])


def demote(text: str) -> str:
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("#"):
            line = "#" + line
        out.append(line)
    return "\n".join(out)


def rebase_links(text: str) -> str:
    # ](file.png) or ](other.md) inside docs/ -> ](docs/file.png); absolute URLs and anchors untouched
    return re.sub(r"\]\((?!https?://|#|docs/|/)([^)]+)\)", r"](docs/\1)", text)


def main() -> None:
    docs = Path("docs")
    chunks = []
    for part in PARTS:
        text = (docs / part).read_text().strip()
        if part in STAGE_DOCS:
            text = rebase_links(demote(text))
        chunks.append(text)
    Path("README.md").write_text("\n\n".join(chunks) + "\n")


if __name__ == "__main__":
    main()
