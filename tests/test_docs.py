"""The documentation: README.md stays a front door (at most 24,000 bytes, a link to every docs/ file), every
relative link in README.md, docs/ and benchmarks/ leads to a file and, with an anchor, to a heading there, every
test and Python file the docs cite exists, and the README's commands of what people do most parse. Reads files
only (quick tier)."""
import ast
import functools
import importlib
import pathlib
import re
import shlex

import pytest

from classification import recipes

REPO = pathlib.Path(__file__).resolve().parent.parent
TESTS = REPO / 'tests'
README = REPO / 'README.md'
README_LIMIT = 24_000


def doc_files():
    return [README, *sorted((REPO / 'docs').glob('*.md')), *sorted((REPO / 'benchmarks').glob('*.md'))]


def name(path):
    return path.relative_to(REPO).as_posix()


def per_doc(test):
    docs = doc_files()
    return pytest.mark.parametrize('doc', docs, ids=[name(path) for path in docs])(test)


FENCE = re.compile(r'^\s*(```|~~~)')
HEADING = re.compile(r'^(#{1,6})\s+(.*?)\s*#*\s*$')
LINK = re.compile(r'\[([^\]]*)\]\(([^()\s]+)\)')
CODE_SPAN = re.compile(r'(`+)(.+?)(?<!`)\1(?!`)', re.S)
# tests/test_x.py::test_name, test_x.py::test_name, tests/test_x.py, test_x.py
QUALIFIED = re.compile(r'(?<![\w/.-])(?:tests/)?(test_\w+)\.py(?:::(test_\w+))?')
BARE = re.compile(r'(?<![\w/.:-])(test_\w+)')


def prose_and_code(text):
    """(lines outside fenced code blocks, the text of the fenced blocks)."""
    prose, code, fenced = [], [], False
    for line in text.split('\n'):
        if FENCE.match(line):
            fenced = not fenced
            continue
        (code if fenced else prose).append(line)
    return prose, '\n'.join(code)


def paragraphs(lines):
    return re.split(r'\n\s*\n', '\n'.join(lines))


def github_slug(heading):
    """GitHub's anchor for a heading: its text lowercased, punctuation other than - and _ removed, spaces as -."""
    text = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', heading)  # a link in a heading shows its text
    return re.sub(r'[^\w\- ]', '', text.strip().lower()).replace(' ', '-')


@functools.lru_cache(maxsize=None)
def anchors(path):
    """The anchors of a Markdown file's headings, repeated slugs numbered as GitHub does (slug, slug-1, ...)."""
    prose, _ = prose_and_code(path.read_text(encoding='utf-8'))
    seen, result = {}, set()
    for line in prose:
        match = HEADING.match(line)
        if match:
            slug = github_slug(match.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            result.add(slug if count == 0 else f'{slug}-{count}')
    return frozenset(result)


def links(path):
    """Every [text](target) outside code (fenced blocks and code spans)."""
    prose, _ = prose_and_code(path.read_text(encoding='utf-8'))
    for paragraph in paragraphs(prose):
        for match in LINK.finditer(CODE_SPAN.sub('', paragraph)):
            yield match.group(2)


@functools.lru_cache(maxsize=None)
def defined_tests():
    """{test file name: names of the test functions and methods defined in it}."""
    found = {}
    for path in TESTS.glob('*.py'):
        tree = ast.parse(path.read_text(encoding='utf-8'), filename=str(path))
        found[path.name] = {node.name for node in ast.walk(tree)
                            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith('test_')}
    return found


def citations(path):
    """(test file or None, test function or None) for every test the file cites: file-qualified forms anywhere,
    bare `test_name`s inside code spans."""
    text = path.read_text(encoding='utf-8')
    for match in QUALIFIED.finditer(text):
        yield match.group(1) + '.py', match.group(2)
    prose, _ = prose_and_code(text)
    for paragraph in paragraphs(prose):
        for span in CODE_SPAN.finditer(paragraph):
            for bare in BARE.finditer(QUALIFIED.sub('', span.group(2))):
                yield None, bare.group(1)


def test_github_slug_follows_githubs_rule():
    assert github_slug("The Habana README's commands and what they run") == \
        'the-habana-readmes-commands-and-what-they-run'
    assert github_slug('`--compile`') == '--compile'
    assert github_slug('Dataset folders (`classification/data.py`)') == 'dataset-folders-classificationdatapy'
    assert github_slug("9. The README's first set-up command, timed") == '9-the-readmes-first-set-up-command-timed'


def test_readme_is_at_most_24000_bytes():
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f'README.md is {size:,} bytes, more than {README_LIMIT:,}: move reference text to docs/'


def test_readme_links_to_every_docs_file():
    linked = {(README.parent / target.split('#')[0]).resolve() for target in links(README)}
    missing = [name(path) for path in sorted((REPO / 'docs').glob('*.md')) if path.resolve() not in linked]
    assert not missing, f'README.md: no link to {", ".join(missing)}'


@pytest.mark.parametrize('doc', sorted((REPO / 'docs').glob('*.md')), ids=lambda path: name(path))
def test_each_docs_file_starts_with_a_title_and_a_link_back_to_the_readme(doc):
    lines = [line for line in doc.read_text(encoding='utf-8').split('\n') if line.strip()]
    assert lines and lines[0].startswith('# '), f'{name(doc)}: the first line is not a "# Title": {lines[:1]}'
    assert len(lines) > 1 and '](../README.md)' in lines[1], \
        f'{name(doc)}: the line after the title is not a link back to the README: {lines[1:2]}'


@per_doc
def test_every_relative_link_leads_to_a_file_and_its_anchor_to_a_heading(doc):
    problems = []
    for target in links(doc):
        if re.match(r'[a-z][a-z0-9+.-]*:', target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition('#')
        linked = (doc.parent / file_part).resolve() if file_part else doc
        if not linked.exists():
            problems.append(f'{name(doc)}: link ({target}): no file {file_part!r} (relative to {name(doc.parent) or "."}/)')
        elif anchor and linked.suffix == '.md' and anchor not in anchors(linked):
            problems.append(f'{name(doc)}: link ({target}): no heading in {linked.relative_to(REPO).as_posix()} '
                            f'has the anchor #{anchor}; its anchors: {", ".join(sorted(anchors(linked)))}')
    assert not problems, '\n'.join(problems)


@per_doc
def test_every_cited_test_exists(doc):
    defined = defined_tests()
    everywhere = set().union(*defined.values())
    problems = []
    for file, function in citations(doc):
        if file is None and (TESTS / f'{function}.py').exists():
            continue  # a bare test module name, e.g. `test_multinode`
        if file is not None and file not in defined:
            problems.append(f'{name(doc)}: cites tests/{file}, which does not exist')
        elif file is not None and function is not None and function not in defined[file]:
            problems.append(f'{name(doc)}: cites {file}::{function}, which tests/{file} does not define')
        elif file is None and function not in everywhere:
            problems.append(f'{name(doc)}: cites `{function}`, which no tests/*.py defines')
    assert not problems, '\n'.join(problems)


PY_PATH = re.compile(r'`([^`\s]+\.py)(?:::\w+)?`')
UPSTREAM_FILES = {'imagenet/main.py', 'presets.py'}  # pytorch/examples' and torchvision's, named as upstream's
FOLDERS_OF_BARE_NAMES = ('', 'tests', 'benchmarks', 'classification', 'model')


@per_doc
def test_every_python_file_the_docs_name_exists(doc):
    """A `path.py` in a code span is a file of this repository (a bare name: at the top, or in tests/,
    benchmarks/, classification/ or model/), so a moved or renamed module leaves no stale name."""
    problems = []
    for match in PY_PATH.finditer(doc.read_text(encoding='utf-8')):
        path = match.group(1)
        places = [path] if '/' in path else [f'{folder}/{path}'.lstrip('/') for folder in FOLDERS_OF_BARE_NAMES]
        if path not in UPSTREAM_FILES and not any((REPO / place).is_file() for place in places):
            problems.append(f'{name(doc)}: names `{path}`, which is not a file of this repository')
    assert not problems, '\n'.join(problems)


TASKS_HEADING, NEXT_HEADING = '## What people do most', '\n## '


def readme_task_commands():
    """The `python SCRIPT.py ...` commands of the README's table of what people do most (what stands before
    `python`, a launcher or variables, is left out)."""
    text = README.read_text(encoding='utf-8')
    section = text[text.index(TASKS_HEADING):]
    section = section[:section.index(NEXT_HEADING, len(TASKS_HEADING))]
    for row in section.split('\n'):
        cells = row.split('|')
        if len(cells) < 4 or not cells[2].strip().startswith('`'):
            continue
        words = shlex.split(re.search(r'`([^`]+)`', cells[2]).group(1))
        if 'python' in words:
            at = words.index('python')
            yield words[at + 1], words[at + 2:]


def test_the_readmes_commands_of_what_people_do_most_parse_with_their_scripts_parsers():
    commands = list(readme_task_commands())
    assert len(commands) >= 9
    for script, argv in commands:
        module = importlib.import_module(pathlib.Path(script).stem)
        parser = module.build_parser() if hasattr(module, 'build_parser') else module.get_args_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f'README.md: `python {script} {shlex.join(argv)}` does not parse')
        if getattr(args, 'recipe', None) not in (None, 'list'):
            assert args.recipe in recipes.RECIPES, f'README.md: {script} --recipe {args.recipe}: no such recipe'
