"""Loading the CA from PEM: every bad input is refused naming the item, what is wrong and the fix."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from tether.core.identity.ca import DAY_S, build_issuer, build_trust_anchor
from tether.core.identity.issuer_config import CaConfigError, CaConfigItem, load_ca
from tether.core.identity.names import Mesh

T0 = 1_750_000_000
MESH = Mesh(control_plane_namespace="linkerd", trust_domain="cluster.local")
PEM = Encoding.PEM


def key_pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, password: bytes | None = None) -> bytes:
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, encryption)


class Material:
    def __init__(self, *, issuer_validity_s: int = 365 * DAY_S, mesh: Mesh = MESH) -> None:
        self.anchor_key = ec.generate_private_key(ec.SECP256R1())
        self.issuer_key = ec.generate_private_key(ec.SECP256R1())
        self.anchor = build_trust_anchor(self.anchor_key, mesh, wall_time_s=T0, serial=1)
        self.issuer = build_issuer(
            self.issuer_key,
            mesh,
            anchor=self.anchor,
            anchor_key=self.anchor_key,
            wall_time_s=T0,
            serial=2,
            validity_s=issuer_validity_s,
        )

    def inputs(self, **override: bytes) -> dict[str, bytes]:
        return {
            "trust_anchor_pem": self.anchor.public_bytes(PEM),
            "issuer_certificate_pem": self.issuer.public_bytes(PEM),
            "issuer_key_pem": key_pem(self.issuer_key),
            **override,
        }


GOOD = Material()


def refused(inputs: dict[str, bytes], wall_time_s: float = T0 + 10) -> CaConfigError:
    with pytest.raises(CaConfigError) as caught:
        load_ca(**inputs, wall_time_s=wall_time_s)
    return caught.value


def test_load_ca_accepts_init_material_and_reads_the_mesh_from_the_issuer() -> None:
    loaded = load_ca(**GOOD.inputs(), wall_time_s=T0 + 10)
    assert loaded.issuer.mesh == MESH
    assert loaded.trust_anchors == (GOOD.anchor,)
    assert loaded.issuer.not_after_s == T0 + 365 * DAY_S


def test_load_ca_accepts_a_bundle_of_anchors_during_rotation() -> None:
    other = Material()
    bundle = other.anchor.public_bytes(PEM) + GOOD.anchor.public_bytes(PEM)
    assert len(load_ca(**GOOD.inputs(trust_anchor_pem=bundle), wall_time_s=T0).trust_anchors) == 2


def test_load_ca_refuses_an_issuer_from_another_anchor() -> None:
    other = Material()
    error = refused(GOOD.inputs(trust_anchor_pem=other.anchor.public_bytes(PEM)))
    assert error.item is CaConfigItem.ISSUER_CERTIFICATE
    assert "not signed by any trust anchor" in error.message


def test_load_ca_refuses_a_key_that_does_not_match_the_issuer() -> None:
    error = refused(GOOD.inputs(issuer_key_pem=key_pem(ec.generate_private_key(ec.SECP256R1()))))
    assert error.item is CaConfigItem.ISSUER_KEY and "does not belong" in error.message


@pytest.mark.parametrize(
    ("key", "word"),
    [(ed25519.Ed25519PrivateKey.generate(), "Ed25519"), (ec.generate_private_key(ec.SECP384R1()), "secp384r1")],
)
def test_load_ca_refuses_a_key_of_the_wrong_type(key: object, word: str) -> None:
    error = refused(GOOD.inputs(issuer_key_pem=key_pem(key)))  # type: ignore[arg-type]
    assert error.item is CaConfigItem.ISSUER_KEY and word in error.message and "P-256" in error.message


def test_load_ca_refuses_an_encrypted_key() -> None:
    error = refused(GOOD.inputs(issuer_key_pem=key_pem(GOOD.issuer_key, b"secret")))
    assert error.item is CaConfigItem.ISSUER_KEY and "encrypted" in error.message


@pytest.mark.parametrize("field", ["trust_anchor_pem", "issuer_certificate_pem", "issuer_key_pem"])
def test_load_ca_refuses_garbage_naming_the_item(field: str) -> None:
    error = refused(GOOD.inputs(**{field: b"-----BEGIN NOTHING-----\nxx\n"}))
    expected = {
        "trust_anchor_pem": CaConfigItem.TRUST_ANCHOR,
        "issuer_certificate_pem": CaConfigItem.ISSUER_CERTIFICATE,
        "issuer_key_pem": CaConfigItem.ISSUER_KEY,
    }[field]
    assert error.item is expected and "tether identity init" in error.message


def test_load_ca_refuses_an_expired_issuer_saying_when() -> None:
    short = Material(issuer_validity_s=DAY_S)
    error = refused(short.inputs(), wall_time_s=T0 + 2 * DAY_S)
    assert error.item is CaConfigItem.ISSUER_CERTIFICATE
    assert "expired" in error.message and "signed by the trust anchor" in error.message


def test_load_ca_refuses_an_issuer_not_valid_yet() -> None:
    assert "not valid yet" in refused(GOOD.inputs(), wall_time_s=T0 - 3600).message


def test_load_ca_refuses_a_leaf_posing_as_issuer_or_anchor() -> None:
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, MESH.issuer_name)])
    not_ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(GOOD.anchor.subject)
        .public_key(leaf_key.public_key())
        .serial_number(9)
        .not_valid_before(GOOD.issuer.not_valid_before_utc)
        .not_valid_after(GOOD.issuer.not_valid_after_utc)
        .sign(GOOD.anchor_key, hashes.SHA256())
    )
    error = refused(GOOD.inputs(issuer_certificate_pem=not_ca.public_bytes(PEM), issuer_key_pem=key_pem(leaf_key)))
    assert error.item is CaConfigItem.ISSUER_CERTIFICATE and "not a CA" in error.message
    error = refused(GOOD.inputs(trust_anchor_pem=not_ca.public_bytes(PEM)))
    assert error.item is CaConfigItem.TRUST_ANCHOR and "self-signed CA" in error.message


def test_load_ca_refuses_an_issuer_whose_name_is_not_identity_dot_mesh() -> None:
    odd = Material(mesh=Mesh(control_plane_namespace="linkerd", trust_domain="cluster.local"))
    # Re-sign the same key under a CN that does not start with "identity.".
    odd.issuer = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer.example")]))
        .issuer_name(odd.anchor.subject)
        .public_key(odd.issuer_key.public_key())
        .serial_number(3)
        .not_valid_before(odd.issuer.not_valid_before_utc)
        .not_valid_after(odd.issuer.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(odd.anchor_key, hashes.SHA256())
    )
    error = refused(odd.inputs())
    assert error.item is CaConfigItem.ISSUER_CERTIFICATE and "identity.<control-plane-namespace>" in error.message
