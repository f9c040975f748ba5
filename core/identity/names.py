"""Identity names, as Linkerd spells them, parsed once with errors that say what to write instead.

A workload's identity is a DNS name built from its service account and the mesh it belongs to:

    <serviceaccount>.<namespace>.serviceaccount.identity.<control-plane-namespace>.<trust-domain>

and the issuer (the intermediate CA that signs leaf certificates) is named
``identity.<control-plane-namespace>.<trust-domain>``. A Kubernetes service account token names the
same workload as the username ``system:serviceaccount:<namespace>:<serviceaccount>``.

Namespaces are DNS labels (no dots), while service account names are DNS subdomains (dots allowed), so
an identity is read from the right: the mesh suffix is stripped, the last label left is the namespace
and everything before it is the service account.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DNS_NAME_LENGTH_MAX = 253  # RFC 1035 (without the trailing dot)
DNS_LABEL_LENGTH_MAX = 63
USERNAME_PREFIX = "system:serviceaccount:"

_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")


class IdentityNameError(ValueError):
    """A string that cannot be an identity, issuer name, namespace or service account name here."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Mesh:
    """The two names every identity of one mesh ends with."""

    control_plane_namespace: str
    trust_domain: str

    def __post_init__(self) -> None:
        check_label(self.control_plane_namespace, "control plane namespace")
        check_dns_name(self.trust_domain, "trust domain")

    @property
    def issuer_name(self) -> str:
        """The issuer certificate's common name: ``identity.<control-plane-namespace>.<trust-domain>``."""
        return f"identity.{self.control_plane_namespace}.{self.trust_domain}"

    @property
    def identity_suffix(self) -> str:
        return f".serviceaccount.{self.issuer_name}"

    @classmethod
    def from_issuer_name(cls, name: str, *, trust_domain: str | None = None) -> Mesh:
        """Read the mesh back from an issuer CN. The trust domain may have dots, the namespace may not,
        so the first label after ``identity.`` is the namespace and the rest is the trust domain."""
        parts = name.split(".", 2)
        if len(parts) != 3 or parts[0] != "identity":
            raise IdentityNameError(
                f"{name!r} is not an issuer name; expected identity.<control-plane-namespace>.<trust-domain>, "
                "for example identity.linkerd.cluster.local"
            )
        mesh = cls(control_plane_namespace=parts[1], trust_domain=parts[2])
        if trust_domain is not None and mesh.trust_domain != trust_domain:
            raise IdentityNameError(f"issuer {name!r} is not in trust domain {trust_domain!r}")
        return mesh


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadIdentity:
    """One workload of one mesh: who a leaf certificate speaks for."""

    namespace: str
    serviceaccount: str
    mesh: Mesh

    def __post_init__(self) -> None:
        check_label(self.namespace, "namespace")
        check_dns_name(self.serviceaccount, "service account")
        check_dns_name(self.name, "identity")

    @property
    def name(self) -> str:
        """The DNS name a leaf certificate carries as its one subject alternative name."""
        return f"{self.serviceaccount}.{self.namespace}{self.mesh.identity_suffix}"

    @property
    def username(self) -> str:
        """The Kubernetes username a TokenReview reports for this workload's service account token."""
        return f"{USERNAME_PREFIX}{self.namespace}:{self.serviceaccount}"


def parse_identity(name: str, mesh: Mesh) -> WorkloadIdentity:
    """The workload that ``name`` names in ``mesh``, or IdentityNameError saying what is wrong with it."""
    suffix = mesh.identity_suffix
    if not name.endswith(suffix):
        raise IdentityNameError(
            f"identity {name!r} is not in this mesh: expected <serviceaccount>.<namespace>{suffix}, "
            f"for example default.emojivoto{suffix}"
        )
    workload, _, namespace = name[: -len(suffix)].rpartition(".")
    if not workload:
        raise IdentityNameError(
            f"identity {name!r} lacks a service account or namespace: expected <serviceaccount>.<namespace>{suffix}"
        )
    return WorkloadIdentity(namespace=namespace, serviceaccount=workload, mesh=mesh)


def parse_username(username: str) -> tuple[str, str] | None:
    """``(namespace, serviceaccount)`` from ``system:serviceaccount:NS:SA``, or None for any other user
    (a person, a node, a malformed name): only service accounts get workload certificates."""
    if not username.startswith(USERNAME_PREFIX):
        return None
    namespace, separator, serviceaccount = username[len(USERNAME_PREFIX) :].partition(":")
    if not separator or not namespace or not serviceaccount or ":" in serviceaccount:
        return None
    return namespace, serviceaccount


def check_label(text: str, what: str) -> None:
    """A DNS-1123 label: lowercase letters, digits and '-', 1-63 characters, alphanumeric at both ends."""
    if len(text) > DNS_LABEL_LENGTH_MAX or not _LABEL.fullmatch(text):
        raise IdentityNameError(
            f"{what} {text!r} is not a DNS label: use 1-{DNS_LABEL_LENGTH_MAX} lowercase letters, digits "
            "and '-', starting and ending with a letter or digit"
        )


def check_dns_name(text: str, what: str) -> None:
    """A DNS-1123 subdomain: dot-separated labels, at most 253 characters."""
    if not text or len(text) > DNS_NAME_LENGTH_MAX:
        raise IdentityNameError(f"{what} {text[:80]!r} must be 1-{DNS_NAME_LENGTH_MAX} characters long")
    for label in text.split("."):
        if len(label) > DNS_LABEL_LENGTH_MAX or not _LABEL.fullmatch(label):
            raise IdentityNameError(
                f"{what} {text!r} is not a DNS name: each dot-separated part must be 1-{DNS_LABEL_LENGTH_MAX} "
                "lowercase letters, digits and '-', starting and ending with a letter or digit"
            )
