"""server/config.py: every setting checked before anything starts, the plugins' own settings included."""

import pytest

from server.config import ConfigError, from_env, load, plugin_sections

SECTIONS = plugin_sections()


def problems(**environ) -> str:
    with pytest.raises(ConfigError) as err:
        load(SECTIONS, environ={k: str(v) for k, v in environ.items()})
    return str(err.value)


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("MAX_BATCH", "abc", "an integer"),
        ("MAX_BATCH", "0", "an integer >= 1"),
        ("MAX_QUEUE", "-5", ">= 1"),
        ("JPEG_QUALITY", "101", "from 0 to 100"),
        ("REQUEST_TIMEOUT", "nan", "a number"),
        ("LOG_JSON", "maybe", "true or false"),
        ("ENGINE", "vllm", "one of diffusers, sglang"),
        ("DEFAULT_SIZE", "1000x1000", "multiples of 16"),
        ("DEFAULT_SIZE", "huge", "WIDTHxHEIGHT"),
        ("QUALITY_STEPS", "ultra:50", "PRESET:STEPS"),
        ("NSFW_ACTION", "Block", "one of flag, blur, block"),
        ("NSFW_THRESHOLD", "1.5", "from 0 to 1"),
        ("NSFW_CHECK", "sometimes", "always"),
        ("UPLOAD_RETRIES", "99", "from 0 to 10"),
        ("MAX_LORAS", "0", "from 1 to 16"),
        ("NUNCHAKU_FALLBACK", "fp4", "one of none, fp8, bf16"),
        ("TENANT_WEIGHTS", "key-abc:0", "NAME:WEIGHT"),
        ("TENANT_WEIGHTS", "key-abc:nan", "NAME:WEIGHT"),
        ("TENANT_WEIGHTS", "bad name:2", "NAME:WEIGHT"),
        ("TENANT_HEADER", "X Tenant", "an HTTP header name"),
        ("TENANT_QUEUE_SHARE", "0", "from 0.01 to 1"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable_and_what_it_accepts(variable, value, expected):
    message = problems(**{variable: value})
    assert message.startswith(f"{variable}={value!r}: expected") and expected in message
    assert "\n" not in message


def test_every_problem_is_reported_at_once_and_sizes_are_checked_together():
    assert problems(MAX_BATCH="x", PORT="70000").count("\n") == 1
    assert "DEFAULT_SIZE" in problems(DEFAULT_SIZE="4096x4096")  # past MAX_PIXELS
    assert "MIN_PIXELS" in problems(MIN_PIXELS="5000000")


def test_plugins_declare_their_settings_and_overrides_find_their_section():
    settings = from_env(max_loras=2, nsfw_action="block", max_batch=3)
    assert settings.section("lora").max_loras == 2
    assert settings.section("nsfw").nsfw_action == "block"
    assert settings.max_batch == 3


def test_tenant_weights_and_when_the_queue_is_shared():
    settings = from_env(tenant_weights="key-3f2a9c1b0d4e:2, batch:0.5")
    assert settings.weights == {"key-3f2a9c1b0d4e": 2.0, "batch": 0.5}
    assert not from_env(api_key="one").several_tenants  # one key: nobody to share the queue with
    assert from_env(api_key="one,two").several_tenants
    assert from_env(api_key="one", admin_api_key="admin").several_tenants
    assert from_env(tenant_header="X-Tenant").several_tenants
    assert not from_env(admin_api_key="a,b").several_tenants  # no API_KEY: no key is checked, one tenant


def test_each_settings_entry_point_is_named_after_an_installed_plugin():
    """A plugin reads its section by its own name (`self.config`): a settings entry under another name would
    be flags that configure nothing."""
    from server.plugins import discover

    assert set(SECTIONS) <= set(discover())
    assert {"lora", "nsfw", "upload", "nunchaku"} <= set(SECTIONS)


# -- the README's settings tables ---------------------------------------------------------------------------------


def _readme_defaults() -> dict[str, str]:
    """Each setting a README table row names (`| `A`, `B` | a, b | meaning |`), with the default the row gives."""
    import re
    from pathlib import Path

    rows = (Path(__file__).resolve().parents[2] / "README.md").read_text().splitlines()
    defaults = {}
    for row in (r for r in rows if r.startswith("| `")):
        names_cell, default_cell = (cell.strip() for cell in row.strip("|").split("|")[:2])
        names = re.findall(r"`([A-Z][A-Z0-9_]*)`", names_cell)
        given = default_cell.split(", ") if len(names) > 1 else [default_cell]
        defaults.update(zip(names, given, strict=len(names) > 1))
    return defaults


def _agrees(written: str, default) -> bool:
    """README's words for a default: none (empty), "from ..." or "..., else ..." (worked out at run time), a
    number (with a note in parentheses), true/false, or the value in backticks."""
    if written == "none" or written.startswith("from ") or ", else " in written:
        return str(default) in ("", ".")
    value = written.split(" (")[0].strip("`")
    if isinstance(default, bool) or value in ("true", "false"):
        return str(default).lower() == value
    if isinstance(default, int | float):
        return float(value) == default
    return str(default) == value


def test_the_readmes_settings_tables_give_the_defaults_the_code_has():
    """The README's tables are the settings' second home, for readers: they must not drift from the code."""
    from server.config import Settings, env_name, options

    settings = {env_name(f): f.default for section in (Settings, *SECTIONS.values()) for f in options(section)}
    written = {name: text for name, text in _readme_defaults().items() if name in settings}
    assert len(written) > 50  # the tables are still there
    assert {name: text for name, text in written.items() if not _agrees(text, settings[name])} == {}
