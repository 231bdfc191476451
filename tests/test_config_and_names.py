"""Issue 8 item 7: every key of gateway.toml is honoured or refused, and team names are validated
as subject-safe tokens when a policy is loaded (two names may never share a ledger subject)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from enclave_gateway import cli, config
from enclave_gateway.runtime import Gateway
from enclave_gateway.services.policy import PolicyError, load_bundle

ROOT = Path(__file__).resolve().parent.parent


def _bundle(tmp_path: Path, budgets_extra: str = "", policy_extra: str = "") -> Path:
    folder = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", folder)
    with open(folder / "budgets.toml", "a") as f:
        f.write(budgets_extra)
    with open(folder / "access_policy.csv", "a") as f:
        f.write(policy_extra)
    return folder


@pytest.mark.parametrize("name", ["a.b", "a b", "a*", "a>", "", "x" * 65])
def test_a_team_name_that_is_not_a_subject_token_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(PolicyError, match="team name"):
        load_bundle(_bundle(tmp_path, budgets_extra=f'\n[teams."{name}"]\ncap_micros = 1\n'))


def test_a_team_name_in_the_access_policy_is_checked_too(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="access_policy.csv"):
        load_bundle(_bundle(tmp_path, policy_extra="p, team:a.b, enclave-tiny\n"))
    assert load_bundle(_bundle(tmp_path / "ok", budgets_extra='\n[teams.a_b]\ncap_micros = 1\n'))


@pytest.mark.parametrize("entry, needle", [
    ('endpoint = "a"\nendpoints = ["b"]', "names both endpoint and endpoints"),
    ("", "has no endpoint"),
    ('endpoints = ["a", "a"]', "must be distinct"),
    ('endpoints = ["a b"]', "must be distinct"),
])
def test_a_model_without_distinct_valid_endpoints_is_refused(tmp_path: Path, entry: str, needle: str) -> None:
    folder = _bundle(tmp_path)
    with open(folder / "catalog.toml", "a") as f:
        f.write(f'\n[[model]]\nid = "ha"\n{entry}\ncontext_length = 512\ndefault_max_tokens = 8\n'
                "prompt_micros_per_1k = 1\ncompletion_micros_per_1k = 1\n")
    with pytest.raises(PolicyError, match=needle):
        load_bundle(folder)


MODEL = ('\n[[model]]\nid = "{id}"\nendpoints = ["a"]\ncontext_length = 512\ndefault_max_tokens = {max}\n'
         'prompt_micros_per_1k = {rate}\ncompletion_micros_per_1k = 1\n{extra}')


@pytest.mark.parametrize("models, needle", [
    ([{"id": "x", "extra": 'aliases = ["tiny"]\n'}], "would resolve to both"),  # tiny: enclave-tiny's alias
    ([{"id": "x", "max": 0}], "default_max_tokens"),
    ([{"id": "x", "max": 600}], "default_max_tokens"),
    ([{"id": "x", "rate": -1}], "must not be negative"),
    ([{"id": "x", "extra": "max_output_tokens = 0\n"}], "max_output_tokens"),
    ([{"id": "x", "extra": 'strategy = "weighted"\nweights = [1, 2]\n'}], "one positive weight per endpoint"),
    ([{"id": "x", "extra": "weights = [1]\n"}], "has weights but strategy"),
    ([{"id": "x", "extra": 'replacement = "enclave-tiny"\n'}], "only a deprecated model is replaced"),
    ([{"id": "x", "extra": 'status = "deprecated"\nreplacement = "y"\n'},
      {"id": "y", "extra": 'status = "deprecated"\nreplacement = "x"\n'}], "form a cycle"),
    ([{"id": "x", "extra": 'status = "deprecated"\nreplacement = "y"\n'},
      {"id": "y", "extra": 'status = "retired"\n'}], "retired model 'y'"),
    ([{"id": "x", "extra": 'status = "deprecated"\nreplacement = "nope"\n'}], "unknown model 'nope'"),
])
def test_a_catalog_that_would_route_ambiguously_or_wrongly_is_refused(tmp_path: Path, models: list[dict[str, object]],
                                                                      needle: str) -> None:
    folder = _bundle(tmp_path)
    with open(folder / "catalog.toml", "a") as f:
        for m in models:
            f.write(MODEL.format(**{"max": 8, "rate": 1, "extra": "", **m}))
    with pytest.raises(PolicyError, match=needle):
        load_bundle(folder)


@pytest.mark.parametrize("text, where", [
    ("[http]\nhots = '0.0.0.0'\n", "hots"),
    ("[nats]\nport = 'x'\n", "port"),
    ("typo = 1\n", "typo"),
    ("[policy]\ntrusted_signer = []\n", "trusted_signer"),
])
def test_an_unknown_or_mistyped_key_is_refused_with_its_name(tmp_path: Path, text: str, where: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError, match=where):
        config.load(path)
    assert cli.main(["up", "--config", str(path)]) == 2
    assert where in capsys.readouterr().out


def test_every_key_reaches_what_it_configures(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        'data_dir = "d"\npolicy_dir = "p"\n'
        '[nats]\nhost = "127.0.0.2"\nport = 4333\n'
        '[http]\nhost = "127.0.0.3"\nport = 8181\nmax_body_bytes = 1000\nrequest_timeout_s = 7.5\n'
        '[engine]\nserve_tiny = true\nendpoint = "tiny"\nport = 9191\n'
        '[auth]\ntrust_dev_issuer = false\n'
        '[policy]\ntrusted_signers = ["keys/ops.pub.json"]\n'
        '[audit]\ncheckpoint_events = 50\ncheckpoint_seconds = 5.0\n'
        '[enclave]\nenabled = true\nallow = ["10.20.0.0/16", "gpu-1.enclave.local"]\n'
    )
    gw = Gateway.from_config(path, nats_port=None, http_port=None)
    assert gw.data_dir == (tmp_path / "d").resolve() and gw.policy_dir == (tmp_path / "p").resolve()
    assert 'listen: "127.0.0.2:4333"' in gw.broker.config_text()
    assert (gw.http_host, gw.http_port, gw.max_body_bytes, gw.request_timeout_s) == ("127.0.0.3", 8181, 1000, 7.5)
    assert gw.engine is not None and gw.engine.port == 9191 and gw.serve_tiny == "tiny"
    assert gw.trust_dev_issuer is False
    assert gw.trusted_signers == (tmp_path / "keys" / "ops.pub.json",)
    assert (gw.audit.checkpoint_events, gw.audit.checkpoint_seconds) == (50, 5.0)
    assert gw.egress_allow == ("10.20.0.0/16", "gpu-1.enclave.local")


def test_a_bad_enclave_allow_list_entry_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('[enclave]\nenabled = true\nallow = ["http://anything"]\n')
    with pytest.raises(ValueError, match="neither a CIDR nor a host name"):
        Gateway.from_config(path, nats_port=None, http_port=None)


def test_a_policy_file_holding_a_nul_is_refused(tmp_path: Path) -> None:
    """The digest separates names and contents with NUL: a NUL inside a file could move bytes
    from one file to the next under the same signature (hostile review)."""
    with pytest.raises(PolicyError, match="NUL"):
        load_bundle(_bundle(tmp_path, policy_extra="p, team:alpha, enclave-tiny\0\n"))
