import os

from keystoneauth1 import loading as ks_loading
from oslo_config import generator
import pytest

from imagebackend import exception
from imagebackend import opts

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
SAMPLE = os.path.join(ROOT, "etc", "imagebackend",
                      "imagebackend.conf.sample")
GENERATOR_CONF = os.path.join(ROOT, "etc", "imagebackend",
                              "imagebackend-config-generator.conf")


def test_committed_sample_config_is_current(tmp_path):
    out = tmp_path / "sample.conf"
    generator.main(["--config-file", GENERATOR_CONF,
                    "--output-file", str(out)])
    with open(SAMPLE) as f:
        committed = f.read()
    assert out.read_text() == committed, (
        "etc/imagebackend/imagebackend.conf.sample is stale; run "
        "'tox -e genconfig' and commit the result")


def _keystoneauth_option_names():
    names = {o.dest for o in ks_loading.get_auth_common_conf_options()}
    names |= {o.dest for o in ks_loading.get_session_conf_options()}
    names |= {o.dest for o in ks_loading.get_adapter_conf_options()}
    for plugin in ("password", "v3applicationcredential", "token"):
        names |= {o.dest for o in
                  ks_loading.get_auth_plugin_conf_options(plugin)}
    return names


def test_every_option_of_ours_has_full_sentence_help():
    # keystoneauth1's and oslo.concurrency's options carry their own help.
    theirs = _keystoneauth_option_names()
    checked = 0
    for group, options in opts.list_opts():
        if group == "oslo_concurrency":
            continue
        for opt in options:
            if group == "glance" and opt.dest in theirs:
                continue
            assert opt.help and opt.help.rstrip().endswith("."), (
                group, opt.name)
            assert len(opt.help) > 30, (group, opt.name)
            checked += 1
    assert checked >= 20


def test_new_conf_reads_a_config_file(tmp_path):
    path = tmp_path / "ib.conf"
    path.write_text("[imagebackend]\nimages_type = raw\n"
                    "instances_path = /srv/instances\n")
    conf = opts.new_conf(["--config-file", str(path)])
    assert conf.imagebackend.images_type == "raw"
    assert conf.imagebackend.instances_path == "/srv/instances"
    assert conf.imagebackend.base_dir_name == "_base"
    assert conf.imagebackend.force_raw_images is True


def test_new_conf_rejects_an_unknown_backend_name(tmp_path):
    path = tmp_path / "ib.conf"
    path.write_text("[imagebackend]\nimages_type = lvm\n")
    with pytest.raises(exception.ConfigValueError) as err:
        opts.new_conf(["--config-file", str(path)])
    assert isinstance(err.value, ValueError)
    message = str(err.value)
    assert "[imagebackend] images_type" in message
    assert str(path) in message and "'lvm'" in message
