import pytest

from kiln.api.health import go_duration
from kiln.config import ConfigError, load_config


def write(tmp_path, text):
    p = tmp_path / "config.yaml"
    p.write_text(text)
    return p


def test_defaults_without_a_file(tmp_path, monkeypatch):
    monkeypatch.delenv("KILN_CONFIG", raising=False)
    c = load_config(write(tmp_path, ""))
    assert c.listen == "127.0.0.1:8080" and c.network.subnet == "10.77.0.0/16"
    assert c.thermal.warm_after == 30 and c.thermal.cold_after == 1800 and c.publish.domain == "localhost"


def test_env_var_chooses_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CONFIG", str(write(tmp_path, "listen: 127.0.0.1:9999\n")))
    assert load_config().port == 9999


@pytest.mark.parametrize(
    "text, key",
    [
        ("listne: 1\n", "listne: unknown key"),
        ("thermal:\n  warm_afer: 3\n", "thermal.warm_afer: unknown key"),
        ("thermal:\n  warm_after: -1\n", "thermal.warm_after"),
        ("network:\n  subnet: 300.1.0.0/16\n", "network.subnet"),
        ("network:\n  subnet: 10.0.0.0/30\n", "network.subnet"),
        ("listen: nowhere\n", "listen"),
        ("limits:\n  max_sandboxes: lots\n", "limits.max_sandboxes"),
    ],
)
def test_invalid_keys_are_named(tmp_path, text, key):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert key in str(e.value)


def test_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_go_duration():
    assert go_duration(5) == "5s" and go_duration(65) == "1m5s" and go_duration(8130) == "2h15m30s"
