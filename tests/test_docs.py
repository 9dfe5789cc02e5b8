"""The README, docs/ and bench/RESULTS.md name only things that exist: files, links and their
anchors, CLI commands and flags, make targets, spec fields; the README stays short and its
results trace to bench/RESULTS.md."""
import fnmatch
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "bench" / "RESULTS.md"
CLI_DOC = ROOT / "docs" / "cli.md"
DOCS = [README, RESULTS, *sorted((ROOT / "docs").glob("*.md"))]
DOC_IDS = [str(p.relative_to(ROOT)) for p in DOCS]

#: Paths the docs name as what a command writes, absent from a fresh checkout.  Each must be a
#: default output spelled out in the bench sources (checked below), so it cannot drift.
WRITTEN_BY_COMMANDS = {"bench/results/cpu.json", "bench/results/gpu.json", "bench/results/gpu-structures/"}

PATH_RE = re.compile(r"(?<![\w./-])((?:bench/results|studies|deploy|docs)/[\w.*/\-]*)")
LINK_RE = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE_RE = re.compile(r"```[a-z]*\n(.*?)```", re.S)
CODE_SPAN_RE = re.compile(r"`([^`\n]+)`")
HISTORY_RE = re.compile(r"\bsession \d|\bround\b|issue \d+|-s\d+\.json", re.I)
NUMBER_RE = re.compile(r"(?<![\w.])\d+(?:\.\d+)?")


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _is_template(path: str) -> bool:
    """`bench/results/PREFIX`, `studies/NAME.yaml`: placeholders spelled in capitals."""
    return any(part.isupper() for part in re.split(r"[-/._\[\]]", path) if part)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set:
    headings = re.findall(r"^#+ (.+)$", FENCE_RE.sub("", _text(path)), re.M)
    return {_slug(h) for h in headings}


def _section(text: str, heading: str) -> str:
    """The body of the `## heading` section of a markdown text."""
    match = re.search(rf"^## {re.escape(heading)}.*?$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"no section '## {heading}'"
    return match.group(1)


@pytest.mark.parametrize("doc", DOCS, ids=DOC_IDS)
def test_named_repository_paths_exist(doc):
    missing = []
    for path in PATH_RE.findall(_text(doc)):
        path = path.rstrip(".")
        if _is_template(path) or path in WRITTEN_BY_COMMANDS:
            continue
        if "*" in path:
            if not list(ROOT.glob(path)):
                missing.append(path)
        elif not (ROOT / path).exists() and not (ROOT / (path + ".json")).exists():  # an --out prefix
            missing.append(path)
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


def test_paths_written_by_commands_are_the_commands_defaults():
    sources = "\n".join(_text(p) for p in [*(ROOT / "bench").glob("*.py"), ROOT / "bench" / "gpu.sh"])
    for path in WRITTEN_BY_COMMANDS:
        name = path.removeprefix("bench/results/").rstrip("/")
        assert re.search(rf"""["'/]{re.escape(name)}["'/]""", sources), f"no bench source writes {path}"


@pytest.mark.parametrize("doc", DOCS, ids=DOC_IDS)
def test_relative_links_and_their_anchors_exist(doc):
    broken = []
    for target in LINK_RE.findall(FENCE_RE.sub("", _text(doc))):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (doc.parent / file_part).resolve() if file_part else doc
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(target)
    assert not broken, f"{doc.name} has broken links: {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=DOC_IDS)
def test_no_history_wording(doc):
    found = HISTORY_RE.findall(_text(doc))
    assert not found, f"{doc.name} speaks of its history: {found}"


def test_readme_is_a_short_front_door():
    lines = _text(README).splitlines()
    assert len(lines) < 150, f"README.md has {len(lines)} lines"
    blocks = FENCE_RE.findall(_text(README))
    assert any("make quickstart" in b and "make test" in b for b in blocks)


def test_readme_results_and_cost_numbers_appear_in_results_md():
    readme, results = _text(README), _text(RESULTS)
    assert "<!-- results-table -->" in readme
    table = readme.split("<!-- results-table -->", 1)[1].split("\n\n", 1)[0]
    cost = _section(readme, "Cost")
    checked, absent = 0, []
    for line in [*table.splitlines()[2:], *cost.splitlines()]:
        line = re.sub(r"\]\([^)]*\)", "]", line)  # link targets are not numbers
        for number in NUMBER_RE.findall(line):
            checked += 1
            if not re.search(rf"(?<![\d.]){re.escape(number)}(?!\d)", results):
                absent.append(number)
    assert checked > 40  # the table is there and was read
    assert not absent, f"README numbers not in bench/RESULTS.md: {absent}"


def test_every_result_file_is_named_in_results_md():
    results = _text(RESULTS)
    named = [p.rstrip(".") for p in PATH_RE.findall(results) if p.startswith("bench/results/")]
    tracked = subprocess.run(["git", "ls-files", "bench/results"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    unnamed = [f for f in tracked if not any(f == n or fnmatch.fnmatch(f, n) for n in named)]
    assert not unnamed, f"result files bench/RESULTS.md does not name: {unnamed}"


# -- the command line ------------------------------------------------------------------------

def _parser():
    from gsmsearch.cli import build_parser

    return build_parser()


def _subparsers(parser):
    import argparse

    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def _options(parser) -> set:
    return {s for a in parser._actions for s in a.option_strings}


def _code(text: str) -> list:
    """The code spans and fenced blocks of a markdown text (where commands are spelled)."""
    return FENCE_RE.findall(text) + CODE_SPAN_RE.findall(FENCE_RE.sub("", text))


def _doc_commands(text: str) -> set:
    return {c for snippet in _code(text) for c in re.findall(r"(?<![\w/.-])gsmsearch ([a-z][a-z-]*)", snippet)}


@pytest.mark.parametrize("doc", DOCS, ids=DOC_IDS)
def test_every_gsmsearch_command_named_exists(doc):
    commands = _subparsers(_parser())
    unknown = _doc_commands(_text(doc)) - set(commands)
    assert not unknown, f"{doc.name} names gsmsearch commands that do not exist: {unknown}"


def test_every_flag_in_cli_doc_belongs_to_its_section_commands():
    parser = _parser()
    commands = _subparsers(parser)
    text = _text(CLI_DOC)
    sections = re.split(r"^## ", text, flags=re.M)
    checked = 0
    for section in sections:
        heading, _, body = section.partition("\n")
        named = [c for c in re.findall(r"gsmsearch ([a-z-]+)", heading) if c in commands]
        allowed = _options(parser) if not named else set().union(*(_options(commands[c]) for c in named))
        if not named:  # the preamble: the top-level flags
            body = section
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z-]*|-[a-z])\b", FENCE_RE.sub("", body)):
            checked += 1
            assert flag in allowed, f"docs/cli.md section {heading!r}: {flag} is not a flag of {named or 'gsmsearch'}"
    assert checked > 40


def _example_command_lines():
    for doc in DOCS:
        for block in FENCE_RE.findall(_text(doc)):
            for line in block.splitlines():
                line = line.split("  #", 1)[0].strip()
                if re.search(r"(?:^|\s)gsmsearch [a-z]", line):
                    yield pytest.param(line, id=f"{doc.name}: {line[:60]}")


@pytest.mark.parametrize("line", list(_example_command_lines()))
def test_example_commands_parse(line):
    words = shlex.split(line)
    args = words[words.index("gsmsearch") + 1:]
    try:
        namespace = _parser().parse_args(args)
    except SystemExit as exit_:  # argparse's way of refusing
        pytest.fail(f"`{line}` is refused by the CLI parser (exit {exit_.code})")
    assert namespace.command == args[0]


# -- make targets and spec fields ------------------------------------------------------------

def test_every_make_target_named_exists():
    targets = set(re.findall(r"^([\w-]+):", _text(ROOT / "Makefile"), re.M))
    for doc in DOCS:
        text = _text(doc)
        named = {t for snippet in _code(text) for t in re.findall(r"(?<![\w-])make ([a-z][\w-]*)", snippet)}
        assert named <= targets, f"{doc.name} names make targets that do not exist: {named - targets}"


def test_every_spec_field_is_documented():
    from gsmsearch.search._spec import FamilySpace, StudySpec, WorkloadSpec

    text = _text(ROOT / "docs" / "study-yaml.md")
    top = _section(text, "Top-level fields")
    workload = _section(text, "`workload`")
    families = _section(text, "`families.<name>`")
    for fields, where in ((StudySpec.model_fields, top), (WorkloadSpec.model_fields, workload),
                          (FamilySpace.model_fields, families)):
        undocumented = [name for name in fields if f"`{name}`" not in where]
        assert not undocumented, f"docs/study-yaml.md does not document {undocumented}"


# -- the README's examples -------------------------------------------------------------------

def _fenced(text: str, language: str) -> list:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def test_readme_example_study_is_a_valid_spec():
    import yaml

    from gsmsearch.search import spec_from_dict

    (block,) = _fenced(_text(README), "yaml")
    spec = spec_from_dict(yaml.safe_load(block), source="README.md")
    assert set(spec.families) == {"gblr", "lowrank", "dense"}
    assert spec.metric_names == ["quality", "relative_flops"]


def test_readme_python_example_runs_and_shows_method_cost_below_executed(tmp_path):
    """The README's API example, run as written in a fresh process (its dense model cached under
    tmp_path): every call exists, and the exported layer executes at least the method's count."""
    import os
    import sys

    (block,) = _fenced(_text(README), "python")
    script = "import torch; torch.set_num_threads(1)\n" + block
    env = {**os.environ, "GSMSEARCH_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert abs(float(lines[0]) - 0.2) < 0.01  # from_dense meets its budget
    executed, method = map(int, lines[2].split())
    assert executed >= method > 0
    quality, relative_flops = map(float, lines[3].split())
    assert 0 < quality <= 1 and 0 < relative_flops < 1
