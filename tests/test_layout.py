"""The layout: the top level holds the scripts users run, utils.py, model/ and one package, classification/; no
module of the package imports a script; the imports of our modules form no cycle; docs/layout.md's import
graph is the one the source has; no function of the package takes more than nine parameters. Reads files only
(quick tier)."""
import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = 'classification'
SCRIPTS = {'train', 'main', 'demo_resnet', 'demo_mobilenet', 'demo_googlenet', 'inference', 'plot_metrics',
           'sample_data', 'shrink_dataset'}
TOP_MODULES = SCRIPTS | {'utils'}  # utils.py: the design card's, imported by the trainers from beside them
LAYOUT_DOC = REPO / 'docs' / 'layout.md'
GRAPH_HEADING = '## Import graph'


def package_modules():
    return sorted(path.stem for path in (REPO / PACKAGE).glob('*.py') if path.stem != '__init__')


def sources():
    """{our module's name: its file}: the top-level modules, model, and the package's modules by their own names."""
    found = {path.stem: path for path in REPO.glob('*.py')}
    found['model'] = REPO / 'model' / '__init__.py'
    found.update({name: REPO / PACKAGE / f'{name}.py' for name in package_modules()})
    return found


def imported(path, ours):
    """The modules of `ours` that the file at `path` imports, at its top or inside functions."""
    inside = path.parent.name == PACKAGE
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1 and inside:         # from . import x / from .x import y
                names.update([node.module] if node.module else [alias.name for alias in node.names])
            elif node.module == PACKAGE:            # from classification import x
                names.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith(PACKAGE + '.'):
                names.add(node.module.split('.', 1)[1])
            elif node.module and node.level == 0:
                names.add(node.module.split('.')[0])
    return sorted(names & ours)


def import_graph():
    found = sources()
    return {name: imported(path, set(found) - {name}) for name, path in found.items()}


def graph_lines(graph):
    """The graph as docs/layout.md writes it: the scripts first, then utils, model and the package's modules,
    each with what it imports."""
    order = sorted(SCRIPTS) + ['utils', 'model'] + package_modules()
    lines = []
    for name in order:
        label = f'`{name}.py`' if name in TOP_MODULES else f'`{name}`'
        uses = ', '.join(f'`{used}`' for used in graph[name]) or 'nothing of ours'
        lines.append(f'- {label}: {uses}')
    return lines


def documented_graph_lines():
    text = LAYOUT_DOC.read_text().split('\n')
    start = text.index(GRAPH_HEADING) + 1
    return [line for line in text[start:] if line.startswith('- ')]


def test_the_top_level_holds_the_scripts_utils_model_and_one_package():
    top_python = {path.stem for path in REPO.glob('*.py')}
    assert top_python == TOP_MODULES, f'top-level modules that are not scripts: {sorted(top_python - TOP_MODULES)}'
    packages = {path.parent.name for path in REPO.glob('*/__init__.py')}
    assert packages == {PACKAGE, 'model'}


def test_no_module_of_the_package_or_model_imports_a_script():
    graph = import_graph()
    for name in package_modules() + ['model']:
        assert not set(graph[name]) & TOP_MODULES, f'{name} imports {sorted(set(graph[name]) & TOP_MODULES)}'


def test_no_script_imports_another_script():
    graph = import_graph()
    for name in SCRIPTS:
        assert not set(graph[name]) & SCRIPTS, f'{name}.py imports {sorted(set(graph[name]) & SCRIPTS)}'


def test_the_imports_form_no_cycle():
    graph = import_graph()
    done, path = set(), []

    def visit(name):
        if name in path:
            raise AssertionError('import cycle: ' + ' -> '.join(path[path.index(name):] + [name]))
        if name in done:
            return
        path.append(name)
        for used in graph[name]:
            visit(used)
        path.pop()
        done.add(name)
    for name in graph:
        visit(name)


def test_docs_layout_shows_the_import_graph_the_source_has():
    expected = graph_lines(import_graph())
    assert documented_graph_lines() == expected, (
        f'{LAYOUT_DOC.relative_to(REPO)} under "{GRAPH_HEADING}" should read:\n' + '\n'.join(expected))


MOST_PARAMETERS = 9  # values that travel together go as one settings value (loaders.LoaderSettings, ...)


def test_no_function_of_the_package_takes_more_than_nine_parameters():
    long_lists = []
    for name in package_modules():
        for node in ast.walk(ast.parse((REPO / PACKAGE / f'{name}.py').read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                count = len(arguments) - (bool(arguments) and arguments[0].arg in ('self', 'cls'))
                if count > MOST_PARAMETERS:
                    long_lists.append(f'{PACKAGE}/{name}.py:{node.lineno} {node.name}: {count} parameters')
    assert not long_lists, '\n'.join(long_lists)
