#    Licensed under the Apache License, Version 2.0 (the "License"); you may
#    not use this file except in compliance with the License. You may obtain
#    a copy of the License at
#
#         http://www.apache.org/licenses/LICENSE-2.0
#
#    Unless required by applicable law or agreed to in writing, software
#    distributed under the License is distributed on an "AS IS" BASIS,
#    WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
#    See the License for the specific language governing permissions and
#    limitations under the License.

"""``imagebackend`` itself: argument checks, errors, broken pipes."""

from unittest import mock

import pytest

from imagebackend.cmd import main
from imagebackend.cmd import output
from imagebackend import opts


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "ib.conf"
    path.write_text("[imagebackend]\ninstances_path = %s\n"
                    "[local_source]\npath = %s\n"
                    % (tmp_path / "instances", tmp_path / "images"))
    (tmp_path / "images").mkdir()
    return str(path)


@pytest.mark.parametrize("argv, up, down", [
    (["disk", "create", "img", "/t", "--size", "1000000001"],
     1000000512, 1000000000),
    (["disk", "create", "img", "/t", "--size", "100"], 512, None),
    (["disk", "resize", "/t", "1025"], 1536, 1024),
])
def test_a_size_that_is_not_whole_sectors_is_refused(
        argv, up, down, capsys):
    with pytest.raises(SystemExit) as exit_:
        main.main(argv)
    assert exit_.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert "is not a multiple of 512" in error
    assert ("give %d" % up) in error
    assert (("or %d" % down) in error) if down else ("or " not in error)


@pytest.mark.parametrize("argv", [
    ["disk", "create", "img\udcff", "/t", "--size", "1G"],
    ["cache", "invalidate", "img\n"],
    ["cache", "verify", "ok", "\x1b[2J"],
    ["cache", "prefetch", "ok", "img\u2028"],
])
def test_an_unusable_image_id_is_refused_before_anything_runs(argv, config,
                                                              capsys):
    with mock.patch.object(opts, "new_conf") as new_conf:
        assert main.main(["--config-file", config] + argv) == 1
    new_conf.assert_not_called()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.isascii()
    assert err.startswith("imagebackend: error: Invalid image id ")
    assert "an image id is 1 to 255 characters of UTF-8 text" in err


def test_argparse_errors_show_arguments_escaped(capsys):
    with pytest.raises(SystemExit):
        main.main(["cache", "list", "\n\x1b[31mforged"])
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "imagebackend: error: unrecognized arguments: \\n\\x1b[31mforged")


def test_a_config_error_found_mid_command_names_option_and_file(tmp_path,
                                                                capsys):
    path = tmp_path / "ib.conf"
    path.write_text("[imagebackend]\ninstances_path = %s\n"
                    "image_source = glance\n[glance]\n"
                    "region_name = $nope\n" % tmp_path)
    assert main.main(["--config-file", str(path), "cache", "prefetch",
                      "0ea1c1f2-4b4b-4d1e-8b5a-2f1f6c8a9e01"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "option [glance] region_name (set in %s)" % path in err
    assert "'$nope' refers to $nope" in err


def test_a_reader_that_goes_away_ends_the_command_quietly(config, capsys):
    with mock.patch.object(output, "emit", side_effect=BrokenPipeError):
        assert main.main(["--config-file", config, "cache", "list"]) == (
            main.EXIT_BROKEN_PIPE)
    assert capsys.readouterr().err == ""


def test_ctrl_c_is_one_line(config, capsys):
    with mock.patch.object(output, "emit", side_effect=KeyboardInterrupt):
        assert main.main(["--config-file", config, "cache", "list"]) == (
            main.EXIT_INTERRUPTED)
    assert capsys.readouterr().err == "imagebackend: interrupted\n"


def test_a_foreign_error_message_is_escaped(config, capsys):
    with mock.patch.object(output, "emit",
                           side_effect=RuntimeError("bad\n\x1b[1mthing")):
        assert main.main(["--config-file", config, "cache", "list"]) == 1
    assert capsys.readouterr().err == (
        "imagebackend: error: bad\\n\\x1b[1mthing\n")


def test_a_missing_config_file_is_one_line_naming_it(tmp_path, capsys):
    missing = str(tmp_path / "nope.conf")
    assert main.main(["--config-file", missing, "cache", "list"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith("imagebackend: error: Invalid configuration: ")
    assert missing in err[0] and "--config-file" in err[0]


def test_the_command_line_registers_the_library_options_first(
        config, capsys):
    seen = {}

    def command(args, conf):
        seen.update(groups={g for g in ("imagebackend", "image_cache",
                                        "qemu_img", "oslo_concurrency",
                                        "rbd", "local_source", "glance")
                            if g in conf})
        return None

    parser = main.build_parser()
    args = parser.parse_args(["--config-file", config, "cache", "list"])
    with mock.patch.object(main, "build_parser") as build:
        build.return_value = mock.Mock(parse_args=lambda argv: args)
        args.func = command
        assert main.main([]) == 0
    # An image source's options are registered by the source when a
    # command builds it (sources.load), so a command that uses none does
    # not load, for example, the Glance client.
    assert seen["groups"] == {"imagebackend", "image_cache", "qemu_img",
                              "oslo_concurrency", "rbd"}
