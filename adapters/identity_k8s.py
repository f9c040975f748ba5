"""Token verification through the Kubernetes TokenReview API (``authentication.k8s.io/v1``).

The proxy sends its projected service account token (audience ``identity.l5d.io``); the identity
service asks the API server whether the token is valid for that audience and whom it names. The rule
that turns the review's status into a verdict (authenticated, our audience, a
``system:serviceaccount:NS:SA`` user) lives in core (tokens.verdict_for_review); this adapter only makes the
call and maps transport failures to ``VerifierUnavailable``, since a failed call says nothing about the
token. The API server checks expiry itself, so ``wall_time_s`` is unused here.

The identity service's own service account needs RBAC permission to ``create`` ``tokenreviews``
(Linkerd grants it through a ClusterRole bound to the identity service account).
"""

from __future__ import annotations

import os

import kubernetes.client
import kubernetes.config
import urllib3
from kubernetes.client.exceptions import ApiException

from tether.core.identity.tokens import (
    AUDIENCE,
    TokenRejected,
    TokenVerdict,
    VerifierUnavailable,
    token_text,
    verdict_for_review,
)

# A TokenReview is one round trip to the API server; a Certify call that waits longer than this is
# better answered UNAVAILABLE, so the proxy retries with its own backoff.
REVIEW_TIMEOUT_S = 5.0


class KubernetesTokenVerifier:
    """Verifies tokens with ``AuthenticationV1Api.create_token_review``; blocking, one call per token."""

    def __init__(
        self,
        api: kubernetes.client.AuthenticationV1Api,
        *,
        audience: str = AUDIENCE,
        timeout_s: float = REVIEW_TIMEOUT_S,
    ) -> None:
        assert timeout_s > 0, timeout_s
        self._api = api
        self._audience = audience
        self._timeout_s = timeout_s

    @classmethod
    def from_environment(cls, kubeconfig: str | None = None) -> KubernetesTokenVerifier:
        """In a pod, the in-cluster service account; else ``kubeconfig`` (or $KUBECONFIG, ~/.kube/config).

        Raises kubernetes.config.ConfigException when neither is there.
        """
        if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            kubernetes.config.load_incluster_config()
        else:
            kubernetes.config.load_kube_config(config_file=kubeconfig)
        return cls(kubernetes.client.AuthenticationV1Api())

    def verify(self, token: bytes, wall_time_s: float) -> TokenVerdict:
        text = token_text(
            token,
            missing="send the projected service account token (audience identity.l5d.io)",
            not_ascii="a service account token is a JWT",
        )
        if isinstance(text, TokenRejected):
            return text
        review = kubernetes.client.V1TokenReview(
            api_version="authentication.k8s.io/v1",
            kind="TokenReview",
            spec=kubernetes.client.V1TokenReviewSpec(token=text, audiences=[self._audience]),
        )
        try:
            answer = self._api.create_token_review(review, _request_timeout=self._timeout_s)
        except ApiException as error:
            return VerifierUnavailable(reason=_api_failure(error))
        except (urllib3.exceptions.HTTPError, OSError) as error:
            return VerifierUnavailable(
                reason=f"the Kubernetes API could not be reached ({type(error).__name__}: {error})"
            )
        status = answer.status
        if status is None:
            return VerifierUnavailable(reason="the Kubernetes API answered a TokenReview without a status")
        return verdict_for_review(
            authenticated=bool(status.authenticated),
            username=status.user.username if status.user is not None else None,
            audiences=status.audiences,
            error=status.error,
        )


def _api_failure(error: ApiException) -> str:
    if error.status in (401, 403):
        return (
            f"the Kubernetes API refused the TokenReview (HTTP {error.status} {error.reason}); grant the identity "
            "service's service account `create` on `tokenreviews.authentication.k8s.io`"
        )
    return f"the Kubernetes API failed the TokenReview (HTTP {error.status} {error.reason})"
