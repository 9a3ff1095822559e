# Licensed under the Apache License, Version 2.0 (the "License"); you may
# not use this file except in compliance with the License. You may obtain
# a copy of the License at
#
#      http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS, WITHOUT
# WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the
# License for the specific language governing permissions and limitations
# under the License.

"""``doc/source/safety-tests.rst`` stays true: every safety behaviour it
lists has a unit and a functional test, and every test it names exists.

A node id is checked by reading the test file's syntax tree (no import, so
the check is fast and needs no server): the function must be defined at
the top level of the file, or the class must be defined there and have
the method itself or through its bases (the contract mixins of
``tests/contract``), followed through the file's imports.
"""

import ast
import functools
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
PAGE = os.path.join(ROOT, "doc", "source", "safety-tests.rst")
INDEX = os.path.join(ROOT, "doc", "source", "index.rst")

_ROW = re.compile(r"^   \* - (.*)$")
_CELL = re.compile(r"^     - (.*)$")
_MORE = re.compile(r"^       (\S.*)$")
_NODE_ID = re.compile(r"``(tests/[^`]*::[^`]*)``")


def parse_rows(text):
    """The rows of every list-table of ``text``: a list of
    ``(line number, [cell text, ...])``, header rows included.
    """
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        row, cell, more = (_ROW.match(line), _CELL.match(line),
                           _MORE.match(line))
        if row:
            rows.append((number, [row.group(1)]))
        elif cell and rows:
            rows[-1][1].append(cell.group(1))
        elif more and rows:
            rows[-1][1][-1] += " " + more.group(1)
    return rows


def behaviours(text):
    """``(line, behaviour, unit ids, functional ids)`` of every row that
    is not a header.
    """
    found = []
    for number, cells in parse_rows(text):
        if cells[0] == "Behaviour":
            continue
        assert len(cells) == 3, "line %d: a row has three cells" % number
        found.append((number, cells[0], _NODE_ID.findall(cells[1]),
                      _NODE_ID.findall(cells[2])))
    return found


@functools.lru_cache(maxsize=None)
def _tree(path):
    # Parsed once per file: a contract module is read for every node id
    # that reaches it through a base class.
    with open(os.path.join(ROOT, path)) as f:
        return ast.parse(f.read(), path)


def _module_path(dotted):
    return dotted.replace(".", "/") + ".py"


def _imported(tree):
    """What each name bound by an import of ``tree`` refers to:
    ``{name: (module file, attribute or None)}``.
    """
    names = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                as_module = _module_path(node.module + "." + alias.name)
                if os.path.exists(os.path.join(ROOT, as_module)):
                    names[alias.asname or alias.name] = (as_module, None)
                else:
                    names[alias.asname or alias.name] = (
                        _module_path(node.module), alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = (_module_path(alias.name), None)
    return names


def _class(path, name):
    """The ``ClassDef`` of class ``name`` at the top level of ``path``
    (or the one it imports under that name), with the file it is in.
    """
    tree = _tree(path)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return path, node
    module, attribute = _imported(tree).get(name, (None, None))
    if module and attribute and os.path.exists(os.path.join(ROOT, module)):
        return _class(module, attribute)
    return path, None


def _has_method(path, node, method):
    if any(isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
           and item.name == method for item in node.body):
        return True
    imports = _imported(_tree(path))
    for base in node.bases:
        if isinstance(base, ast.Name):
            base_path, base_node = _class(path, base.id)
        elif (isinstance(base, ast.Attribute)
              and isinstance(base.value, ast.Name)
              and base.value.id in imports
              and imports[base.value.id][1] is None):
            base_path, base_node = _class(imports[base.value.id][0],
                                          base.attr)
        else:
            continue
        if base_node is not None and _has_method(base_path, base_node,
                                                 method):
            return True
    return False


def missing(node_id):
    """Why ``node_id`` names no test, or ``None`` when it names one."""
    parts = node_id.split("::")
    path, names = parts[0], parts[1:]
    if not os.path.isfile(os.path.join(ROOT, path)):
        return "no file %s" % path
    if not os.path.basename(path).startswith("test_"):
        return "%s is not a test file pytest collects" % path
    if "[" in node_id:
        return "name the test function, not one of its cases"
    if len(names) == 1:
        if not names[0].startswith("test"):
            return "%s is not a test name" % names[0]
        if not any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                   and node.name == names[0] for node in _tree(path).body):
            return "no function %s in %s" % (names[0], path)
        return None
    if len(names) == 2:
        cls, method = names
        if not (cls.startswith("Test") and method.startswith("test")):
            return "%s::%s is not a test name" % (cls, method)
        class_path, node = _class(path, cls)
        if node is None:
            return "no class %s in %s" % (cls, path)
        if not _has_method(class_path, node, method):
            return "class %s has no method %s" % (cls, method)
        return None
    return "a node id is FILE::FUNCTION or FILE::CLASS::METHOD"


@pytest.fixture(scope="module")
def page():
    with open(PAGE) as f:
        return f.read()


def test_every_behaviour_has_a_unit_and_a_functional_test(page):
    rows = behaviours(page)
    # The page lists every behaviour in its tables: a parser that found
    # none would pass everything below.
    assert len(rows) >= 80
    for number, behaviour, unit, functional in rows:
        where = "line %d (%s)" % (number, behaviour[:60])
        assert behaviour.strip() and not behaviour.startswith("``tests/")
        assert unit, "%s: no unit test" % where
        assert functional, "%s: no functional test" % where
        assert all(i.startswith("tests/unit/") for i in unit), where
        assert all(i.startswith("tests/functional/")
                   for i in functional), where


def test_every_node_id_names_a_test_that_exists(page):
    rows = behaviours(page)
    named = {i for _n, _b, unit, functional in rows
             for i in unit + functional}
    # Every node id on the page is in a row of a table.
    assert set(_NODE_ID.findall(page)) == named
    problems = sorted("%s: %s" % (i, why) for i, why in
                      ((i, missing(i)) for i in named) if why)
    assert problems == []


def test_the_page_is_linked_from_the_index():
    with open(INDEX) as f:
        # In a toctree of the Sphinx site.
        assert re.search(r"^   safety-tests$", f.read(), re.M)


# -- the checker itself ------------------------------------------------------

@pytest.mark.parametrize("node_id,why", [
    ("tests/unit/test_safety_matrix.py::test_not_here",
     "no function test_not_here"),
    ("tests/unit/no_such_test.py::test_x", "no file"),
    ("tests/unit/test_safety_matrix.py::parse_rows", "not a test name"),
    ("tests/unit/backends/test_backend_contract.py::TestNoSuchContract"
     "::test_second_create_is_warm", "no class TestNoSuchContract"),
    ("tests/unit/backends/test_backend_contract.py::TestRawContract"
     "::test_not_in_the_contract", "has no method"),
    ("tests/unit/test_safety_matrix.py::test_the_page_is_linked_from_the_"
     "index[x]", "not one of its cases"),
])
def test_the_check_refuses_what_names_no_test(node_id, why):
    assert why in missing(node_id)


def test_the_check_finds_methods_through_the_contract_mixins():
    # Defined in tests/contract/backend.py, reached through the test
    # class's base ``contract.BackendContract``.
    assert missing("tests/unit/backends/test_backend_contract.py"
                   "::TestRawContract::test_second_create_is_warm") is None
    assert missing("tests/unit/test_safety_matrix.py"
                   "::test_the_page_is_linked_from_the_index") is None


def test_rows_are_read_cell_by_cell():
    text = "\n".join([
        ".. list-table::",
        "",
        "   * - Behaviour",
        "     - Unit test",
        "     - Functional test",
        "   * - One thing,",
        "       said on two lines.",
        "     - ``tests/unit/a.py::test_a``",
        "       ``tests/unit/b.py::test_b``",
        "     - ``tests/functional/c.py::test_c``",
    ])
    assert behaviours(text) == [
        (6, "One thing, said on two lines.",
         ["tests/unit/a.py::test_a", "tests/unit/b.py::test_b"],
         ["tests/functional/c.py::test_c"])]
