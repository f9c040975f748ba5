"""`tether proxy` identity settings: four fields from a file, TETHER_PROXY_IDENTITY_* or --identity-* flags,
meshed peers' identities, and errors that name the source, the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from identity_mesh import Mesh, identity_of

from tether.adapters.cli import cli
from tether.adapters.proxy_config import load
from tether.core.address import Address
from tether.core.config_file import ConfigFileError

WEB = identity_of("shop", "web")
API = identity_of("shop", "api")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Mesh:
    return Mesh.create(tmp_path_factory.mktemp("mesh"))


@pytest.fixture(scope="module")
def token(mesh: Mesh) -> Path:
    return mesh.token("shop", "web")


def identity_block(mesh: Mesh, token: Path, **changes: str) -> str:
    fields = {
        "local_name": WEB,
        "svc_addr": "127.0.0.1:8080",
        "trust_anchors": str(mesh.trust_anchors),
        "token_file": str(token),
        **changes,
    }
    return "identity:\n" + "".join(f"  {key}: {value}\n" for key, value in fields.items() if value)


def load_text(tmp_path: Path, text: str, **options: object):
    path = tmp_path / "proxy.yaml"
    path.write_text(text)
    return load(config_path=str(path), environ=options.pop("environ", {}), **options)  # type: ignore[arg-type]


def refused(tmp_path: Path, text: str, **options: object) -> str:
    with pytest.raises(ConfigFileError) as caught:
        load_text(tmp_path, text, **options)
    return str(caught.value)


def test_identity_from_the_config_file(tmp_path: Path, mesh: Mesh, token: Path) -> None:
    process = load_text(tmp_path, identity_block(mesh, token))
    identity = process.identity
    assert identity is not None
    assert (identity.local_name, identity.svc_addr, identity.token_file) == (WEB, Address("127.0.0.1", 8080), token)
    assert identity.trust_anchors_pem == mesh.trust_anchors.read_bytes()


def test_no_identity_setting_means_no_identity(tmp_path: Path) -> None:
    assert load_text(tmp_path, "admin: 127.0.0.1:5191\n").identity is None


def test_environment_overrides_the_file_and_flags_override_the_environment(
    tmp_path: Path, mesh: Mesh, token: Path
) -> None:
    environ = {"TETHER_PROXY_IDENTITY_SVC_ADDR": "127.0.0.1:9090", "TETHER_PROXY_IDENTITY_LOCAL_NAME": API}
    process = load_text(tmp_path, identity_block(mesh, token), environ=environ)
    assert process.identity is not None
    assert (process.identity.local_name, process.identity.svc_addr) == (API, Address("127.0.0.1", 9090))
    flagged = load_text(
        tmp_path, identity_block(mesh, token), environ=environ, identity_flags={"svc_addr": "127.0.0.1:7070"}
    )
    assert flagged.identity is not None and flagged.identity.svc_addr == Address("127.0.0.1", 7070)


def test_identity_entirely_from_the_environment(tmp_path: Path, mesh: Mesh, token: Path) -> None:
    environ = {
        "TETHER_PROXY_IDENTITY_LOCAL_NAME": WEB,
        "TETHER_PROXY_IDENTITY_SVC_ADDR": "127.0.0.1:8080",
        "TETHER_PROXY_IDENTITY_TRUST_ANCHORS": str(mesh.trust_anchors),
        "TETHER_PROXY_IDENTITY_TOKEN_FILE": str(token),
    }
    process = load(config_path=None, environ=environ)
    assert process.identity is not None and process.identity.local_name == WEB


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"svc_addr": ""},
            "identity.svc_addr: is missing (the local_name, token_file, trust_anchors setting(s) turn identity on",
        ),
        ({"local_name": ""}, "identity.local_name: is missing"),
        ({"local_name": "Web.Shop"}, "identity.local_name: identity 'Web.Shop' is not a DNS name"),
        ({"svc_addr": "identity-service"}, "identity.svc_addr: 'identity-service' has no port"),
        ({"trust_anchors": "/nonexistent/anchors.crt"}, "/nonexistent/anchors.crt cannot be read (No such file"),
        ({"token_file": "/nonexistent/token"}, "identity.token_file: /nonexistent/token cannot be read"),
    ],
)
def test_identity_errors_name_the_field_and_the_fix(
    tmp_path: Path, mesh: Mesh, token: Path, changes: dict[str, str], expected: str
) -> None:
    message = refused(tmp_path, identity_block(mesh, token, **changes))
    assert expected in message and "proxy.yaml" in message
    fix = message.rsplit("; ", 1)[1]
    assert fix.startswith(("set it to", "give")), message


def test_trust_anchors_must_be_pem_ca_certificates(tmp_path: Path, mesh: Mesh, token: Path) -> None:
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("not a certificate\n")
    assert "holds no PEM certificate" in refused(tmp_path, identity_block(mesh, token, trust_anchors=str(garbage)))
    leaf = tmp_path / "leaf.crt"
    leaf.write_bytes(mesh.issue("shop", "web").leaf_pem)
    message = refused(tmp_path, identity_block(mesh, token, trust_anchors=str(leaf)))
    assert f"CN={WEB}, which is not a CA certificate" in message and "not a workload or issuer leaf" in message


def test_identity_errors_from_the_environment_name_the_variable(tmp_path: Path, mesh: Mesh, token: Path) -> None:
    environ = {"TETHER_PROXY_IDENTITY_SVC_ADDR": "nowhere"}
    message = refused(tmp_path, identity_block(mesh, token), environ=environ)
    assert message.startswith("environment: TETHER_PROXY_IDENTITY_SVC_ADDR: 'nowhere' has no port")
    assert "unknown field" in refused(tmp_path, "identity: {local_name: x, color: blue}\n")


def test_meshed_peers_take_a_port_or_a_port_and_an_identity(tmp_path: Path, mesh: Mesh, token: Path) -> None:
    text = (
        "outbound:\n  routes: {web: [127.0.0.1:8080], api: [127.0.0.1:8081]}\n"
        f"  meshed: {{web: 4143, api: {{port: 5143, identity: {API}}}}}\n" + identity_block(mesh, token)
    )
    [outbound] = load_text(tmp_path, text).roles
    assert outbound.meshed == {"web": 4143, "api": 5143}
    assert outbound.identities == {"api": API}


def test_a_meshed_identity_needs_an_identity_of_our_own(tmp_path: Path) -> None:
    text = f"outbound:\n  routes: {{api: [127.0.0.1:8081]}}\n  meshed: {{api: {{port: 5143, identity: {API}}}}}\n"
    message = refused(tmp_path, text)
    assert "outbound.meshed.api.identity: asks for mTLS, which needs a certificate of this proxy's own" in message
    bad = "outbound:\n  routes: {api: [127.0.0.1:8081]}\n  meshed: {api: {port: 5143, identity: NOT_A_NAME}}\n"
    assert "outbound.meshed.api.identity: identity 'NOT_A_NAME' is not a DNS name" in refused(tmp_path, bad)


def test_tether_proxy_flag_errors_exit_2_naming_the_flag(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["proxy", "--identity-local-name", WEB], env={})
    assert result.exit_code == 2
    assert "identity.svc_addr: is missing" in result.output and "--identity-svc-addr" in result.output
