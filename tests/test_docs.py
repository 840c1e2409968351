"""The documentation stays true to the repository: README.md and docs/*.md.

- every relative link resolves: the file or folder exists, and a #anchor names a heading of the
  target by GitHub's slug rules;
- every `deris-rerank` command shown in a bash block parses with the command's own parser (and its
  subcommand's --help works), as do the demo's; `deris-rerank SUBCOMMAND --flag` in inline code
  names flags that subcommand has;
- every Python example parses, and the `deris_rerank` modules and names the pages mention exist;
- docs/architecture.md's layout names every module of the package (and every benchmark), and only
  files that exist;
- .ci/run runs README's test command as written.

Nothing here needs the reference fixtures, a network or a model.
"""
from __future__ import annotations

import ast
import contextlib
import importlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

from deris_rerank.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINKED = [*PAGES, REPO / "CHANGELOG.md", REPO / "weights" / "README.md"]  # pages whose links are checked

FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
SHELL_OPERATORS = {"&&", "||", ";", "|", "&", "(", ")"}
SHELL_KEYWORDS = {"do", "then", "else", "time"}


def page_id(path: Path) -> str:
    return str(path.relative_to(REPO))


def split_blocks(text: str) -> Tuple[List[Tuple[int, str]], List[Tuple[str, int, str]]]:
    """(prose lines as (line number, text), code blocks as (language, first line number, text))."""
    prose, blocks = [], []
    fence, language, start, body = None, "", 0, []
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None:
            if match:
                fence, language, start, body = match.group(2), match.group(3).lower(), number + 1, []
            else:
                prose.append((number, line))
        elif match and match.group(2).startswith(fence) and not match.group(3):
            blocks.append((language, start, "\n".join(body)))
            fence = None
        else:
            body.append(line)
    assert fence is None, "a code block is not closed"
    return prose, blocks


def github_slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text (inline markup removed) lower-cased, everything but
    letters, digits, '_', '-' and spaces dropped, spaces turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set:
    """Every anchor of a Markdown file's headings (duplicates numbered -1, -2, ... as GitHub does)."""
    prose, _ = split_blocks(path.read_text(encoding="utf-8"))
    seen: Dict[str, int] = {}
    found = set()
    for _, line in prose:
        match = HEADING.match(line)
        if match:
            slug = github_slug(match.group(2))
            found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return found


def links(path: Path) -> Iterator[Tuple[int, str]]:
    """(line number, target) of every Markdown link and image outside code."""
    prose, _ = split_blocks(path.read_text(encoding="utf-8"))
    for number, line in prose:
        for match in LINK.finditer(CODE_SPAN.sub("code", line)):
            yield number, match.group(1)


def relative_links() -> List[Tuple[Path, int, str]]:
    return [(path, number, target) for path in LINKED if path.is_file() for number, target in links(path)
            if not re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target)]


@pytest.mark.parametrize("page", LINKED, ids=page_id)
def test_every_page_exists_and_starts_with_what_it_is_for(page):
    assert page.is_file(), f"{page_id(page)} is missing"
    if page.parent == REPO / "docs":
        prose, _ = split_blocks(page.read_text(encoding="utf-8"))
        lines = [line for _, line in prose if line.strip()]
        assert lines[0].startswith("# "), f"{page_id(page)} does not start with a title"
        assert not lines[1].startswith(("#", "-", "|")), f"{page_id(page)}: say what the page is for under its title"


def test_every_relative_link_resolves():
    broken = []
    for page, number, target in relative_links():
        file_part, _, anchor = target.partition("#")
        resolved = (page.parent / file_part).resolve() if file_part else page
        where = f"{page_id(page)}:{number}: {target}"
        if not resolved.exists():
            broken.append(f"{where}: no such file")
        elif REPO not in resolved.parents and resolved != REPO:
            broken.append(f"{where}: outside the repository")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{where}: no heading with the anchor #{anchor} in {page_id(resolved)}")
        elif anchor and resolved.suffix != ".md":
            broken.append(f"{where}: an anchor into a file that is not Markdown")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_docs_are_reachable_from_the_readme():
    linked = {(REPO / target.partition("#")[0]).resolve() for _, target in links(REPO / "README.md")}
    for page in PAGES[1:]:
        assert page.resolve() in linked, f"README.md does not link {page_id(page)}"


def test_the_slug_rules():
    assert github_slug("Training DeRIS (`train-deris`) and the embedded default") == "training-deris-train-deris-and-the-embedded-default"
    assert github_slug("From the Hugging Face Hub (`hf://` paths)") == "from-the-hugging-face-hub-hf-paths"
    assert github_slug("results.jsonl lines") == "resultsjsonl-lines"
    assert github_slug("Set answers: no object, one or several") == "set-answers-no-object-one-or-several"


# --------------------------------------------------------------------------------------- commands


def shell_commands(page: Path) -> Iterator[Tuple[int, List[str]]]:
    """(line number, argv) of each simple command in the page's bash blocks: continuation lines
    joined, comments dropped, split at ;, &&, || and |, leading VAR=value assignments dropped."""
    _, blocks = split_blocks(page.read_text(encoding="utf-8"))
    for language, start, body in blocks:
        if language not in ("bash", "sh", "shell"):
            continue
        lines = body.split("\n")
        number = 0
        while number < len(lines):
            first, line = number, lines[number]
            while line.endswith("\\") and number + 1 < len(lines):
                number += 1
                line = line[:-1] + " " + lines[number]
            number += 1
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
            lexer.whitespace_split, lexer.commenters = True, "#"
            command: List[str] = []
            for token in [*lexer, ";"]:
                if token in SHELL_OPERATORS:
                    while command and (command[0] in SHELL_KEYWORDS or re.match(r"^[A-Za-z_]\w*=", command[0])):
                        command.pop(0)
                    if command:
                        yield start + first, command
                    command = []
                else:
                    command.append(token)


def cli_invocations() -> List[Tuple[str, List[str]]]:
    """(where, the arguments after `deris-rerank`) of every command the pages show, the demo's as `segment ...`."""
    found = []
    for page in PAGES:
        for number, argv in shell_commands(page):
            where = f"{page_id(page)}:{number}"
            if argv[0] == "deris-rerank":
                found.append((where, argv[1:]))
            elif argv[:2] == ["python", "demo/segment.py"]:
                found.append((where, ["segment", *argv[2:]]))
            elif argv[:3] == ["python", "-m", "deris_rerank"]:
                found.append((where, argv[3:]))
    return found


def subcommands() -> Dict[str, "argparse.ArgumentParser"]:  # noqa: F821
    parser = build_parser()
    (action,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return dict(action.choices)


def parse(argv: List[str]) -> Tuple[int, str]:
    """(exit code, what the parser printed) of parsing `argv` as `deris-rerank` would; 0 when it parsed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:
            return int(exc.code or 0), out.getvalue()
    return 0, out.getvalue()


def test_the_pages_show_commands():
    shown = {argv[0] for _, argv in cli_invocations() if argv}
    assert {"segment", "batch", "app", "convert", "extract", "train-gate", "evaluate", "train-deris"} <= shown


def test_every_shown_command_parses():
    failures = []
    for where, argv in cli_invocations():
        code, said = parse(argv)
        if code != 0:
            failures.append(f"{where}: deris-rerank {' '.join(argv)}\n    {said.strip().splitlines()[-1] if said.strip() else code}")
    assert not failures, "commands the docs show that do not parse:\n" + "\n".join(failures)


def test_help_of_every_shown_subcommand():
    for name in sorted({argv[0] for _, argv in cli_invocations() if argv}):
        code, said = parse([name, "--help"])
        assert code == 0 and said.startswith(f"usage: deris-rerank {name}"), name


def test_flags_named_in_inline_code_exist():
    commands = subcommands()
    unknown = []
    for page in PAGES:
        prose, _ = split_blocks(page.read_text(encoding="utf-8"))
        text = "\n".join(line for _, line in prose)
        for match in CODE_SPAN.finditer(text.replace("\n", " ")):
            words = match.group(2).split()
            if len(words) < 2 or words[0] != "deris-rerank":
                continue
            assert words[1] in commands or words[1].startswith("-"), f"{page_id(page)}: `{match.group(2)}`: no subcommand {words[1]}"
            options = commands[words[1]]._option_string_actions if words[1] in commands else {}
            for word in words[2:]:
                flag = word.split("=")[0].rstrip(",.;:)]")
                if re.match(r"^--[a-z]", flag) and flag not in options:
                    unknown.append(f"{page_id(page)}: `{match.group(2)}`: {words[1]} has no {flag}")
    assert not unknown, "\n".join(unknown)


def test_the_demo_is_the_segment_command():
    run = subprocess.run([sys.executable, str(REPO / "demo" / "segment.py"), "--help"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: deris-rerank segment")


def test_ci_runs_the_readme_test_command_as_written():
    _, blocks = split_blocks((REPO / "README.md").read_text(encoding="utf-8"))
    shown = {line.strip() for language, _, body in blocks if language == "bash" for line in body.splitlines()
             if "python -m pytest" in line}
    assert shown, "README.md shows no test command"
    ci = {line.strip() for line in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()}
    for line in shown:
        assert line in ci, f".ci/run does not run README's test command {line!r}"


# ---------------------------------------------------------------------------------- Python names


def python_blocks() -> List[Tuple[str, str]]:
    return [(f"{page_id(page)}:{start}", body) for page in PAGES
            for language, start, body in split_blocks(page.read_text(encoding="utf-8"))[1] if language == "python"]


@pytest.mark.parametrize("where,code", python_blocks(), ids=[where for where, _ in python_blocks()])
def test_python_examples_parse_and_import_what_exists(where, code):
    tree = ast.parse(code)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "deris_rerank":
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{where}: {node.module} has no {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "deris_rerank":
                    importlib.import_module(alias.name)


def resolve_dotted(name: str) -> bool:
    """Whether `deris_rerank.a.b.c` is a module, or an attribute (chain) of the longest importable one
    (True, unchecked, for a module that needs an optional package not installed here)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as exc:
            if exc.name and not exc.name.startswith("deris_rerank"):
                return True
            continue
        for attribute in parts[cut:]:
            if not hasattr(value, attribute):
                return False
            value = getattr(value, attribute)
        return True
    return False


def test_named_modules_and_functions_exist():
    missing = []
    for page in PAGES:
        for match in re.finditer(r"`(deris_rerank(?:\.\w+)+)", page.read_text(encoding="utf-8")):
            if not resolve_dotted(match.group(1)):
                missing.append(f"{page_id(page)}: {match.group(1)}")
    assert not missing, "named but not found:\n" + "\n".join(missing)


def test_named_repository_files_exist():
    """Paths of the repository's own files in inline code (package, tests, benchmarks)."""
    missing = []
    for page in PAGES:
        for match in re.finditer(r"`((?:deris_rerank|tests|bench|third_party|\.ci)/[\w./-]*)", page.read_text(encoding="utf-8")):
            path = match.group(1).rstrip(".")
            if not (REPO / path).exists():
                missing.append(f"{page_id(page)}: {path}")
    assert not missing, "named but not in the repository:\n" + "\n".join(missing)


# ------------------------------------------------------------------------------------ the layout


def layout_paths() -> List[str]:
    """The paths docs/architecture.md's layout block names (folders end with '/'), from its indentation."""
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("\n## Package layout\n", 1)[1]
    _, blocks = split_blocks(section)
    body = blocks[0][2]
    stack: List[str] = []
    paths = []
    for line in body.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        assert indent % 2 == 0, f"layout: odd indentation: {line!r}"
        depth = indent // 2
        assert depth <= len(stack) and (depth == 0 or stack[depth - 1].endswith("/")), f"layout: {line!r} has no folder above it"
        name = line.split()[0]
        stack[depth:] = [name]
        paths.append("".join(stack))
    return paths


def test_the_layout_names_only_what_exists():
    missing = [path for path in layout_paths() if not (REPO / path).exists()]
    assert not missing, "docs/architecture.md's layout names what does not exist: " + ", ".join(missing)


def test_the_layout_names_every_module_and_benchmark():
    named = set(layout_paths())
    files = [p for p in (REPO / "deris_rerank").rglob("*.py") if "__pycache__" not in p.parts and p.name != "__init__.py"]
    files += [p for p in (REPO / "bench").iterdir() if p.suffix in (".py", ".sh")]
    folders = [p for p in (REPO / "deris_rerank").rglob("*") if p.is_dir() and p.name != "__pycache__"]
    unnamed = [str(p.relative_to(REPO)) for p in files if str(p.relative_to(REPO)) not in named]
    unnamed += [str(p.relative_to(REPO)) + "/" for p in folders if str(p.relative_to(REPO)) + "/" not in named]
    assert not unnamed, "docs/architecture.md's layout does not name: " + ", ".join(sorted(unnamed))
