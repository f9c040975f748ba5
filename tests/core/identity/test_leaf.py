"""Leaves from the DER template (core/identity/leaf.py) against cryptography's CertificateBuilder, which the
CA used before: the same TBSCertificate bytes for the same fields, a certificate cryptography parses back to
the same values, and a chain ``openssl verify`` accepts."""

from __future__ import annotations

import datetime
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.core.identity.ca import SERIAL_MAX, Issuer, build_issuer, build_trust_anchor, certify, check_request
from tether.core.identity.leaf import (
    COMMON_NAME_BYTES_MAX,
    LEAF_EXTENDED_KEY_USAGE,
    LEAF_KEY_USAGE,
    MEMO_ENTRIES_MAX,
    LeafFields,
    LeafTemplate,
)
from tether.core.identity.names import Mesh
from tether.core.identity.tokens import TokenAccepted

T0 = 1_750_000_000
MESH = Mesh(control_plane_namespace="linkerd", trust_domain="cluster.local")
ANCHOR_KEY, ISSUER_KEY = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
ANCHOR = build_trust_anchor(ANCHOR_KEY, MESH, wall_time_s=T0, serial=1)
ISSUER = build_issuer(ISSUER_KEY, MESH, anchor=ANCHOR, anchor_key=ANCHOR_KEY, wall_time_s=T0, serial=2)
TEMPLATE = LeafTemplate.of(ISSUER, ISSUER_KEY)
LEAF_KEYS = [ec.generate_private_key(ec.SECP256R1()).public_key() for _ in range(4)]
LABELS = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,14}[a-z0-9])?", fullmatch=True)
SHORT_NAMES = st.lists(LABELS, min_size=1, max_size=4).map(".".join).filter(lambda name: len(name) <= 64)
INSTANTS_S = st.integers(0, 4_000_000_000)  # 1970 .. 2096: both UTCTime and GeneralizedTime


def builder_leaf(fields: LeafFields) -> x509.Certificate:
    """The reference: the builder path ca.py used before the template (its exact calls, in its order)."""
    return (
        x509.CertificateBuilder()
        .issuer_name(ISSUER.subject)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(LEAF_KEY_USAGE, critical=True)
        .add_extension(LEAF_EXTENDED_KEY_USAGE, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ISSUER_KEY.public_key()), critical=False)
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, fields.identity)]))
        .public_key(fields.public_key)
        .serial_number(fields.serial)
        .not_valid_before(datetime.datetime.fromtimestamp(fields.not_before_s, tz=datetime.UTC))
        .not_valid_after(datetime.datetime.fromtimestamp(fields.not_after_s, tz=datetime.UTC))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(fields.identity)]), critical=False)
        .sign(ISSUER_KEY, hashes.SHA256())
    )


@st.composite
def leaf_fields(draw: st.DrawFn, names: st.SearchStrategy[str] = SHORT_NAMES) -> LeafFields:
    not_before_s = draw(INSTANTS_S)
    return LeafFields(
        identity=draw(names),
        public_key=draw(st.sampled_from(LEAF_KEYS)),
        serial=draw(st.integers(1, SERIAL_MAX - 1)),
        not_before_s=not_before_s,
        not_after_s=not_before_s + draw(st.integers(1, 400 * 86400)),
    )


@settings(max_examples=200)
@given(leaf_fields())
def test_template_tbs_certificate_equals_the_builders_byte_for_byte(fields: LeafFields) -> None:
    assert TEMPLATE.tbs_certificate(fields) == builder_leaf(fields).tbs_certificate_bytes


@settings(max_examples=50)
@given(leaf_fields())
def test_template_leaf_parses_to_the_builders_fields_and_is_signed_by_the_issuer(fields: LeafFields) -> None:
    ours, reference = x509.load_der_x509_certificate(TEMPLATE.sign(fields)), builder_leaf(fields)
    ours.verify_directly_issued_by(ISSUER)
    assert ours.version == reference.version == x509.Version.v3
    assert ours.serial_number == reference.serial_number == fields.serial
    assert (ours.issuer, ours.subject) == (reference.issuer, reference.subject)
    assert ours.not_valid_before_utc == reference.not_valid_before_utc
    assert ours.not_valid_after_utc == reference.not_valid_after_utc
    assert ours.public_key() == reference.public_key() == fields.public_key
    assert ours.signature_algorithm_oid == reference.signature_algorithm_oid
    assert list(ours.extensions) == list(reference.extensions)


def test_template_leaf_for_a_name_longer_than_a_common_name_has_no_subject_and_a_critical_san() -> None:
    name = "a-service-account-with-a-long-name.emojivoto.serviceaccount.identity.linkerd.cluster.local"
    assert len(name) > COMMON_NAME_BYTES_MAX
    fields = LeafFields(identity=name, public_key=LEAF_KEYS[0], serial=9, not_before_s=T0, not_after_s=T0 + 86400)
    leaf = x509.load_der_x509_certificate(TEMPLATE.sign(fields))
    leaf.verify_directly_issued_by(ISSUER)
    assert leaf.subject == x509.Name([])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and san.value.get_values_for_type(x509.DNSName) == [name]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@pytest.mark.parametrize("name", ["web.emojivoto.serviceaccount.identity.linkerd.cluster.local", "x" * 63 + ".y.z"])
def test_openssl_verify_accepts_a_template_leaf_against_the_chain(name: str, tmp_path: Path) -> None:
    fields = LeafFields(
        identity=name, public_key=LEAF_KEYS[1], serial=2**158 + 7, not_before_s=T0 + 10, not_after_s=T0 + 86400
    )
    files = {
        "anchor.pem": ANCHOR,
        "issuer.pem": ISSUER,
        "leaf.pem": x509.load_der_x509_certificate(TEMPLATE.sign(fields)),
    }
    for file_name, certificate in files.items():
        (tmp_path / file_name).write_bytes(certificate.public_bytes(Encoding.PEM))
    command = ["openssl", "verify", "-attime", str(T0 + 100), "-purpose", "sslclient", "-x509_strict"]
    command += ["-CAfile", str(tmp_path / "anchor.pem"), "-untrusted", str(tmp_path / "issuer.pem")]
    result = subprocess.run([*command, str(tmp_path / "leaf.pem")], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.strip().endswith(": OK"), result.stdout + result.stderr


def test_certify_issues_for_an_identity_longer_than_a_common_name() -> None:
    # The builder refused common names over 64 characters, so such a Certify call used to crash.
    serviceaccount = "a-service-account-with-a-rather-long-name"
    name = f"{serviceaccount}.emojivoto{MESH.identity_suffix}"
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    csr = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
    request = check_request(identity=name, csr=csr.sign(key, hashes.SHA256()).public_bytes(Encoding.DER), mesh=MESH)
    verdict = TokenAccepted(namespace="emojivoto", serviceaccount=serviceaccount)
    issued = certify(request, verdict, Issuer.of(ISSUER, ISSUER_KEY, MESH), wall_time_s=T0 + 100, serial=3)
    leaf = x509.load_der_x509_certificate(issued.leaf_der)
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    ) == [name]


def test_template_memos_stay_bounded_and_do_not_change_the_encoding() -> None:
    template = LeafTemplate.of(ISSUER, ISSUER_KEY)
    first = LeafFields(identity="a.b", public_key=LEAF_KEYS[0], serial=1, not_before_s=T0, not_after_s=T0 + 1)
    before = template.tbs_certificate(first)
    for index in range(MEMO_ENTRIES_MAX + 5):
        name = f"n{index}.b"
        fields = LeafFields(
            identity=name, public_key=LEAF_KEYS[0], serial=1, not_before_s=T0 + index, not_after_s=T0 + 10**6
        )
        assert template.tbs_certificate(fields) == builder_leaf(fields).tbs_certificate_bytes
        assert len(template._names) <= MEMO_ENTRIES_MAX and len(template._validities) <= MEMO_ENTRIES_MAX
    assert template.tbs_certificate(first) == before
