"""Projected service-account tokens for tests and the local pod runner: a JWT signed by a key the CA trusts.

The claims are those of a real kubelet-projected token (iss, sub, aud, exp, iat, nbf, kubernetes.io{namespace,
serviceaccount, pod}); the JWKS is what the API server serves at /openid/v1/jwks.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from meshboot.constants import TOKEN_AUDIENCE, TOKEN_EXPIRATION_SECONDS

DEFAULT_ISSUER = "https://kubernetes.default.svc.cluster.local"


@dataclass
class Issuer:
    """A service-account token issuer (what the API server is for projected tokens)."""

    issuer: str = DEFAULT_ISSUER
    kid: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    key: rsa.RSAPrivateKey = field(default_factory=lambda: rsa.generate_private_key(public_exponent=65537,
                                                                                      key_size=2048))

    def jwks(self) -> dict:
        jwk = json.loads(RSAAlgorithm.to_jwk(self.key.public_key()))
        jwk.update({"kid": self.kid, "use": "sig", "alg": "RS256"})
        return {"keys": [jwk]}

    def token(self, namespace: str, service_account: str, audience: str | list[str] = TOKEN_AUDIENCE,
              ttl: int = TOKEN_EXPIRATION_SECONDS, pod: str = "pod", not_before: float | None = None,
              issued_at: float | None = None, extra: dict | None = None) -> str:
        now = time.time() if issued_at is None else issued_at
        claims = {
            "iss": self.issuer,
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
            "aud": [audience] if isinstance(audience, str) else audience,
            "iat": int(now),
            "nbf": int(now if not_before is None else not_before),
            "exp": int(now + ttl),
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": service_account, "uid": str(uuid.uuid4())},
                "pod": {"name": pod, "uid": str(uuid.uuid4())},
            },
        }
        claims.update(extra or {})
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})
