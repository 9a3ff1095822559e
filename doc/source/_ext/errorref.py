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

"""``.. error-reference::``: every error the library can raise.

Reads ``imagebackend.exception`` at build time: for each class, in the
order the module defines them, its message template (the exact text a
user sees, with each argument shown as ``<name>``), the builtin
exceptions it also is, and its docstring.  The troubleshooting page is
built on it, so it shows the library's real messages.
"""

import inspect
import re

from docutils import statemachine
from sphinx.util import docutils as sphinx_docutils
from sphinx.util import nodes as sphinx_nodes

_PLACEHOLDER = re.compile(r"%\((\w+)\)[-#0 +]*\d*(?:\.\d+)?[sdrfi]")


def error_classes():
    """The library's exception classes, in definition order."""
    from imagebackend import exception
    root = exception.ImageBackendException
    return [value for value in vars(exception).values()
            if inspect.isclass(value) and issubclass(value, root)
            and value.__module__ == exception.__name__]


def template(cls):
    """``cls.msg_fmt`` with each ``%(name)s`` shown as ``<name>``."""
    return _PLACEHOLDER.sub(lambda m: "<%s>" % m.group(1),
                            cls.msg_fmt).replace("%%", "%")


def reference_lines():
    from imagebackend import exception
    root = exception.ImageBackendException
    lines = []
    for cls in error_classes():
        name = cls.__name__
        lines += [name, "~" * len(name), ""]
        lines += [".. code-block:: text", "",
                  "    " + template(cls), ""]
        parents = [base.__name__ for base in cls.__mro__[1:]
                   if base not in (object, BaseException, Exception)
                   and base is not root and issubclass(base, root)]
        builtins = [base.__name__ for base in cls.__mro__[1:]
                    if base.__module__ == "builtins"
                    and base not in (object, BaseException, Exception)]
        facts = []
        if parents:
            facts.append("a kind of ``%s``" % parents[0])
        if builtins:
            facts.append("also caught as %s" % ", ".join(
                "``%s``" % b for b in builtins))
        if facts:
            sentence = "; ".join(facts)
            lines += [sentence[0].upper() + sentence[1:] + ".", ""]
        doc = inspect.getdoc(cls) if cls.__doc__ else None
        if doc:
            lines += doc.splitlines() + [""]
    return lines


class ErrorReference(sphinx_docutils.SphinxDirective):
    has_content = False

    def run(self):
        content = statemachine.StringList(reference_lines(),
                                          source="<error-reference>")
        node = sphinx_nodes.nodes.section()
        node.document = self.state.document
        sphinx_nodes.nested_parse_with_titles(self.state, content, node)
        return node.children


def setup(app):
    app.add_directive("error-reference", ErrorReference)
    return {"parallel_read_safe": True, "version": "1"}
