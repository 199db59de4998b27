from pathlib import Path

import pytest
from typer.testing import CliRunner

from quotameter.cli import app
from quotameter.config import DEFAULT_CONFIG, load_config
from quotameter.errors import ConfigError

BAD = Path(__file__).parent.parent / "fixtures" / "bad-config"

EXPECTED = {
    "unknown-key.yaml": "tiers.free.requests_per_minut",
    "negative-limit.yaml": "tiers.free.requests_per_minute",
    "float-budget-junk.yaml": "tiers.pro.monthly_budget_usd",
    "no-tiers.yaml": "at least one tier",
    "duplicate-price.yaml": "priced twice",
    "not-a-mapping.yaml": "mapping at the top level",
    "broken-yaml.yaml": "not valid YAML",
    "unknown-section.yaml": "billling",
}


def test_the_example_config_is_valid():
    config = load_config(DEFAULT_CONFIG)
    assert set(config.tiers) == {"free", "pro", "enterprise"}
    assert config.tiers["pro"].upgrade_hint == "Upgrade to Enterprise."
    assert all(tier.upgrade_hint for tier in config.tiers.values())


def test_every_bad_fixture_is_covered():
    assert {p.name for p in BAD.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize(("name", "mentions"), sorted(EXPECTED.items()))
def test_bad_config_names_the_offending_path(name, mentions):
    with pytest.raises(ConfigError) as info:
        load_config(BAD / name)
    assert mentions in str(info.value)
    assert name in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_environment_overrides_the_file(monkeypatch):
    monkeypatch.setenv("QUOTAMETER_TIERS__FREE__REQUESTS_PER_MINUTE", "42")
    monkeypatch.setenv("QUOTAMETER_SERVICES__REDIS_URL", "redis://10.1.2.3:6379/1")
    config = load_config(DEFAULT_CONFIG)
    assert config.tiers["free"].requests_per_minute == 42
    assert config.tiers["free"].monthly_tokens == 100000  # the rest of the tier is kept
    assert config.services.redis_url == "redis://10.1.2.3:6379/1"


def test_money_is_decimal_never_float():
    config = load_config(DEFAULT_CONFIG)
    assert str(config.tiers["free"].monthly_budget_usd) == "1.00"
    assert str(config.prices[1].cached_input_per_million_usd) == "0.075"


def test_check_config_command():
    runner = CliRunner()
    ok = runner.invoke(app, ["check-config", str(DEFAULT_CONFIG)])
    assert ok.exit_code == 0 and "OK" in ok.output and "free, pro, enterprise" in ok.output
    bad = runner.invoke(app, ["check-config", str(BAD / "negative-limit.yaml")])
    assert bad.exit_code == 2
    assert "tiers.free.requests_per_minute" in bad.output
