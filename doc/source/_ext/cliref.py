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

"""``.. cli-reference::``: the command-line reference, read from the parser.

Walks ``imagebackend.cmd.main.build_parser()`` and renders one section
per command (usage, description, every argument with its help, choices
and default), so the page lists exactly the commands and flags the
program accepts.  ``.. cli-exit-statuses::`` renders the exit statuses
every command shares, from the constants of ``imagebackend.cmd.main``.
"""

import argparse

from docutils import statemachine
from sphinx.util import docutils as sphinx_docutils
from sphinx.util import nodes as sphinx_nodes


def _subcommands(parser):
    """(name, parser, help) of each subcommand of ``parser``, in order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help
                     for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, sub, helps.get(name)


def walk(parser, prefix=("imagebackend",)):
    """Every leaf command: (words, parser, help), depth first.

    :param parser: an ``argparse.ArgumentParser``.
    :returns: a list of tuples; ``words`` is the command as typed, e.g.
        ``("imagebackend", "disk", "create")``.
    """
    found = []
    for name, sub, text in _subcommands(parser):
        words = prefix + (name,)
        if any(True for _ in _subcommands(sub)):
            found.extend(walk(sub, words))
        else:
            found.append((words, sub, text))
    return found


def _flags(action):
    if action.option_strings:
        metavar = ""
        if action.nargs != 0:
            metavar = " " + (action.metavar or action.dest.upper())
        return ", ".join(opt + metavar for opt in action.option_strings)
    return action.metavar or action.dest


def _escape(text):
    return (text or "").replace("\\", "\\\\").replace("*", "\\*") \
        .replace("`", "\\`").replace("|", "\\|")


def argument_lines(parser):
    """RST definition-list lines for the arguments of ``parser``."""
    lines = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction,
                               argparse._SubParsersAction)):
            continue
        lines.append("``%s``" % _flags(action))
        text = _escape(action.help) if action.help else "(no description)"
        extra = []
        if action.choices:
            extra.append("one of %s" % ", ".join(
                "``%s``" % c for c in action.choices))
        if action.option_strings and action.nargs != 0 and \
                action.default not in (None, [], argparse.SUPPRESS):
            extra.append("default ``%s``" % (action.default,))
        if action.required and action.option_strings:
            extra.append("required")
        if extra:
            text += " (%s)" % "; ".join(extra)
        lines.append("    " + text)
        lines.append("")
    return lines


def reference_lines(parser):
    """The whole reference as RST lines."""
    lines = ["Global options", "--------------", "", "::", ""]
    lines += ["    " + line for line in
              parser.format_usage().strip().splitlines()]
    lines += [""]
    lines += argument_lines(parser)
    for words, sub, text in walk(parser):
        title = " ".join(words)
        lines += [title, "-" * len(title), ""]
        if text:
            lines += [_escape(text), ""]
        lines += ["::", ""]
        usage = sub.format_usage().strip()
        if usage.startswith("usage: "):
            usage = usage[len("usage: "):]
        lines += ["    " + line for line in usage.splitlines()]
        lines += [""]
        if sub.description:
            lines += [_escape(sub.description), ""]
        lines += argument_lines(sub)
    return lines


def exit_status_lines():
    from imagebackend.cmd import main
    return [
        "``0``", "    Success.", "",
        "``1``", "    An error: one line on stderr naming the image or "
                 "file and the fix (``--debug`` adds the traceback).", "",
        "``2``", "    A usage error (an unknown flag, a size that is not a "
                 "whole number of sectors...).", "",
        "``%d``" % main.EXIT_BROKEN_PIPE,
        "    The reader of the output went away (``imagebackend cache "
        "list | head -1``), as for a program stopped by SIGPIPE.", "",
        "``%d``" % main.EXIT_INTERRUPTED,
        "    Interrupted by Ctrl-C (SIGINT).", "",
    ]


class _LinesDirective(sphinx_docutils.SphinxDirective):
    has_content = False

    def lines(self):
        raise NotImplementedError

    def run(self):
        content = statemachine.StringList(
            self.lines(), source="<%s>" % self.name)
        node = sphinx_nodes.nodes.section()
        node.document = self.state.document
        sphinx_nodes.nested_parse_with_titles(self.state, content, node)
        return node.children


class CliReference(_LinesDirective):
    def lines(self):
        from imagebackend.cmd import main
        return reference_lines(main.build_parser())


class CliExitStatuses(_LinesDirective):
    def lines(self):
        return exit_status_lines()


def setup(app):
    app.add_directive("cli-reference", CliReference)
    app.add_directive("cli-exit-statuses", CliExitStatuses)
    return {"parallel_read_safe": True, "version": "1"}
