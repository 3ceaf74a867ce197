"""Who is calling: the pod's projected service-account token, verified locally (PyJWT) or by TokenReview.

Local verification checks signature (against the issuer's keys, cached by kid), expiry, not-before, audience and,
if configured, issuer; the identity is read from the `kubernetes.io` claim or `sub`. TokenReview asks the API
server the same question; its answers are cached briefly so a burst of CSRs costs one review per token.
"""
from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import logging
import ssl
import time
import urllib.request
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .signer import Code, Identity, Refused

if TYPE_CHECKING:
    from jwt.types import Options  # PyJWT >= 2.10; only the type checker reads it

log = logging.getLogger("meshboot.ca")

SA_PREFIX = "system:serviceaccount:"
SA_GROUP = "system:serviceaccounts"
ALLOWED_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
LEEWAY_SECONDS = 60                # clock skew allowed on exp/nbf, as the API server allows
JWKS_REFRESH_INTERVAL = 30.0       # at most one re-fetch of a JWKS URL per interval (on an unknown kid)
SA_TOKEN_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MAX_TOKEN_BYTES = 8 * 1024         # projected service-account tokens are ~1-2 KB
MAX_JWKS_BYTES = 1024 * 1024       # a JWKS document read from --jwks URL


class Authenticator(Protocol):
    async def authenticate(self, token: str) -> Identity: ...


def _unauth(message: str, reason: str) -> Refused:
    return Refused(Code.UNAUTHENTICATED, message, reason)


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str:
    """The token from `authorization: Bearer <token>`; refused when absent or of another scheme."""
    for key, value in metadata:
        if key.lower() == "authorization":
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            if len(text) > MAX_TOKEN_BYTES:
                raise _unauth(f"token too large: the authorization header is {len(text)} bytes, at most "
                              f"{MAX_TOKEN_BYTES} allowed", "token_malformed")
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise _unauth("the authorization header must be 'Bearer <service-account token>'", "no_token")
            return token.strip()
    raise _unauth("missing token: no 'authorization: Bearer <token>' header (the pod's istio-ca projected "
                  "service-account token)", "no_token")


def identity_from_claims(claims: dict[str, Any]) -> Identity:
    """Namespace and service account from the `kubernetes.io` claim, or from `sub`; both must agree if present."""
    from_sub = None
    sub = claims.get("sub")
    if isinstance(sub, str) and sub.startswith(SA_PREFIX):
        parts = sub[len(SA_PREFIX):].split(":")
        if len(parts) == 2 and all(parts):
            from_sub = Identity(parts[0], parts[1])
    from_k8s = None
    k8s = claims.get("kubernetes.io")
    if isinstance(k8s, dict):
        ns, sa = k8s.get("namespace"), (k8s.get("serviceaccount") or {})
        name = sa.get("name") if isinstance(sa, dict) else None
        if isinstance(ns, str) and ns and isinstance(name, str) and name:
            from_k8s = Identity(ns, name)
    if from_sub and from_k8s and from_sub != from_k8s:
        raise _unauth(f"token claims disagree: sub names {from_sub.namespace}/{from_sub.service_account}, "
                      f"kubernetes.io names {from_k8s.namespace}/{from_k8s.service_account}", "token_identity")
    ident = from_k8s or from_sub
    if ident is None:
        raise _unauth("token carries no service-account identity (no kubernetes.io claim, sub is not "
                      "system:serviceaccount:<ns>:<sa>)", "token_identity")
    return ident


# ---- local verification ------------------------------------------------------------------------------------------

@dataclass
class KeySet:
    """Issuer public keys: by kid (from a JWKS), plus keys without a kid (PEM files, kid-less JWKs)."""

    by_kid: dict[str, Any] = field(default_factory=dict)
    anonymous: list[Any] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.by_kid) + len(self.anonymous)

    def merge(self, other: KeySet) -> KeySet:
        return KeySet({**self.by_kid, **other.by_kid}, self.anonymous + other.anonymous)


def keyset_from_jwks(doc: dict[str, Any], where: str) -> KeySet:
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list):
        raise ValueError(f"{where}: not a JWKS document (no 'keys' list)")
    out = KeySet()
    for i, jwk in enumerate(keys):
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(jwk).key
        except (jwt.PyJWKError, jwt.InvalidKeyError) as e:
            raise ValueError(f"{where}: key {i} ({jwk.get('kid', 'no kid')}): {e}") from None
        if jwk.get("kid"):
            out.by_kid[str(jwk["kid"])] = key
        else:
            out.anonymous.append(key)
    if not out:
        raise ValueError(f"{where}: no signing keys")
    return out


def keyset_from_pem(data: bytes, where: str) -> KeySet:
    """Every public key (or certificate's key) in a PEM file, like the API server's --service-account-key-file."""
    out = KeySet()
    for block in data.split(b"-----END ")[:-1]:
        start = block.rfind(b"-----BEGIN ")
        if start < 0:
            continue
        label = block[start + 11:block.index(b"-----", start + 11)]
        pem = block[start:] + b"-----END " + label + b"-----\n"
        try:
            if label == b"CERTIFICATE":
                key: Any = x509.load_pem_x509_certificate(pem).public_key()
            elif b"PRIVATE" in label:
                key = serialization.load_pem_private_key(pem, None).public_key()
            else:
                key = serialization.load_pem_public_key(pem)
        except ValueError as e:
            raise ValueError(f"{where}: unreadable {label.decode()} block ({e})") from None
        if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
            raise ValueError(f"{where}: {type(key).__name__} keys cannot verify service-account tokens")
        out.anonymous.append(key)
    if not out:
        raise ValueError(f"{where}: no PEM public keys")
    return out


def _header(token: str) -> dict[str, Any]:
    """The JOSE header, read directly: PyJWT's decode reads it again, and one full pass per token is enough."""
    head, dot, _ = token.partition(".")
    if not dot:
        raise _unauth("malformed token: not a JWT (no '.' separators)", "token_malformed")
    try:
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, RecursionError):    # bad base64, bad UTF-8, bad or absurdly nested JSON
        raise _unauth("malformed token: the JWT header is not base64url-encoded JSON", "token_malformed") from None
    if not isinstance(header, dict):
        raise _unauth("malformed token: the JWT header is not a JSON object", "token_malformed")
    for name in ("alg", "kid"):
        if name in header and not isinstance(header[name], str):
            raise _unauth(f"malformed token: JWT header field {name} must be a string", "token_malformed")
    return header


def _short(value: Any, limit: int = 80) -> str:
    """A caller-supplied value quoted in a refusal, bounded."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def verify_token(token: str, keys: KeySet, audiences: Sequence[str], issuer: str = "",
                 now: float | None = None) -> Identity:
    """Check one JWT against the key set and the expected claims; the caller's identity or `Refused`."""
    header = _header(token)
    alg = header.get("alg")
    if alg not in ALLOWED_ALGS:
        raise _unauth(f"token algorithm {_short(alg)} not accepted (want one of {', '.join(ALLOWED_ALGS)})",
                      "token_malformed")
    kid = header.get("kid")
    if kid and kid in keys.by_kid:
        candidates = [keys.by_kid[kid]]
    elif kid and not keys.anonymous:
        raise _unauth(f"token signed by an unknown issuer key (kid {_short(kid)} is not in the trusted keys)",
                      "token_unknown_key")
    else:
        candidates = keys.anonymous or list(keys.by_kid.values())
    options: Options = {"require": ["exp"], "verify_aud": True}
    claims: dict[str, Any] | None = None
    for key in [k for k in candidates if _fits(alg, k)]:
        try:
            claims = jwt.decode(token, key, algorithms=[alg], audience=list(audiences), issuer=issuer or None,
                                leeway=LEEWAY_SECONDS, options=options)
            break
        except jwt.InvalidSignatureError:
            continue
        except jwt.ExpiredSignatureError:
            exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
            raise _unauth(f"token expired at {_when(exp)}", "token_expired") from None
        except jwt.ImmatureSignatureError:
            unverified = jwt.decode(token, options={"verify_signature": False})
            nbf = unverified.get("nbf", unverified.get("iat"))
            raise _unauth(f"token not valid yet (not before {_when(nbf)})", "token_not_yet_valid") from None
        except jwt.InvalidAudienceError:
            aud = jwt.decode(token, options={"verify_signature": False}).get("aud")
            raise _unauth(f"token audience {_short(aud)} is not one of the accepted audiences {list(audiences)}",
                          "token_audience") from None
        except jwt.InvalidIssuerError:
            iss = jwt.decode(token, options={"verify_signature": False}).get("iss")
            raise _unauth(f"token issuer {_short(iss)} is not the expected {issuer!r}", "token_issuer") from None
        except jwt.MissingRequiredClaimError as e:
            raise _unauth(f"token is missing the {_short(e.claim)} claim", "token_malformed") from None
        except (jwt.InvalidKeyError, jwt.InvalidAlgorithmError, TypeError, ValueError):
            continue       # a key PyJWT cannot use for this token (it raises TypeError for some): try the next
        except jwt.InvalidTokenError as e:
            raise _unauth(f"invalid token: {str(e)[:200]}", "token_malformed") from None
    if claims is None:
        which = f"issuer key {_short(kid)}" if kid and kid in keys.by_kid else "any trusted issuer key"
        raise _unauth(f"token signature does not verify with {which} (forged or re-signed token)",
                      "token_signature")
    return identity_from_claims(claims)


def _fits(alg: str, key: Any) -> bool:
    """Only keys of the algorithm's family are tried: PyJWT raises TypeError for an RSA key given to ES256."""
    if alg.startswith("ES"):
        return isinstance(key, ec.EllipticCurvePublicKey)
    return isinstance(key, rsa.RSAPublicKey)


def _when(ts: Any) -> str:
    try:
        return dt.datetime.fromtimestamp(float(ts), dt.UTC).isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError):
        return _short(ts)


def fetch_jwks(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET a JWKS URL; in a pod, the API server's /openid/v1/jwks needs the pod's CA and token, so use them."""
    headers = {"Accept": "application/json"}
    ctx = None
    if url.startswith("https://"):
        ca = SA_TOKEN_DIR / "ca.crt"
        ctx = ssl.create_default_context(cafile=str(ca) if ca.is_file() else None)
        token = SA_TOKEN_DIR / "token"
        if token.is_file():
            headers["Authorization"] = f"Bearer {token.read_text().strip()}"
    req = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
        body = resp.read(MAX_JWKS_BYTES + 1)
    if len(body) > MAX_JWKS_BYTES:
        raise ValueError(f"JWKS document larger than {MAX_JWKS_BYTES} bytes")
    return json.loads(body)


class LocalVerifier:
    """PyJWT verification against keys from `--jwks` (file or URL) and/or `--issuer-pem`."""

    def __init__(self, audiences: Sequence[str], issuer: str = "", jwks: str = "", issuer_pem: str = "") -> None:
        self.audiences = tuple(audiences)
        self.issuer = issuer
        self.jwks_source = jwks
        self.issuer_pem = issuer_pem
        self._pem_keys = keyset_from_pem(Path(issuer_pem).read_bytes(), issuer_pem) if issuer_pem else KeySet()
        self._jwks_keys = self._load_jwks() if jwks else KeySet()
        self.keys = self._jwks_keys.merge(self._pem_keys)
        self._last_refresh = time.monotonic()

    @property
    def _jwks_is_url(self) -> bool:
        return self.jwks_source.startswith(("http://", "https://"))

    def _load_jwks(self) -> KeySet:
        if self._jwks_is_url:
            try:
                doc = fetch_jwks(self.jwks_source)
            except (OSError, ValueError) as e:
                raise ValueError(f"--jwks {self.jwks_source}: cannot fetch ({e})") from None
        else:
            try:
                doc = json.loads(Path(self.jwks_source).read_text())
            except (OSError, ValueError) as e:
                raise ValueError(f"--jwks {self.jwks_source}: cannot read ({e})") from None
        return keyset_from_jwks(doc, f"--jwks {self.jwks_source}")

    def verify(self, token: str) -> Identity:
        return verify_token(token, self.keys, self.audiences, self.issuer)

    async def authenticate(self, token: str) -> Identity:
        try:
            return self.verify(token)
        except Refused as e:
            # Keys rotate: an unknown kid may be a new key. Re-read the JWKS (rate-limited) and try once more.
            if e.reason != "token_unknown_key" or not self.jwks_source or \
                    time.monotonic() - self._last_refresh < JWKS_REFRESH_INTERVAL:
                raise
        self._last_refresh = time.monotonic()
        try:
            fresh = await asyncio.to_thread(self._load_jwks)
        except ValueError as e:
            log.warning("JWKS refresh failed", extra={"error": str(e)})
        else:
            self._jwks_keys = fresh
            self.keys = fresh.merge(self._pem_keys)
        return self.verify(token)


# ---- TokenReview -------------------------------------------------------------------------------------------------

class TokenReviewVerifier:
    """Asks the API server (authentication.k8s.io/v1 TokenReview) whether a token is valid, for our audiences."""

    CACHE_SECONDS = 60.0
    CACHE_SIZE = 4096

    def __init__(self, auth_api: Any, audiences: Sequence[str]) -> None:
        self.api = auth_api          # kubernetes.client.AuthenticationV1Api
        self.audiences = tuple(audiences)
        self._cache: OrderedDict[str, tuple[float, Identity]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[Identity]] = {}

    def review(self, token: str) -> Identity:
        from kubernetes.client.exceptions import ApiException  # noqa: PLC0415 - kubernetes only for --token-review
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token, "audiences": list(self.audiences)}}
        try:
            result = self.api.create_token_review(body)
        except ApiException as e:
            raise Refused(Code.UNAVAILABLE, f"TokenReview failed: API server answered {e.status} {e.reason}",
                          "token_review_error") from None
        except OSError as e:
            raise Refused(Code.UNAVAILABLE, f"TokenReview failed: cannot reach the API server ({e})",
                          "token_review_error") from None
        status = result.status
        if status is None or not status.authenticated:
            why = (status.error if status is not None else None) or "not authenticated"
            raise _unauth(f"token rejected by Kubernetes TokenReview: {why}", "token_review_denied")
        if status.audiences is not None and not set(status.audiences) & set(self.audiences):
            raise _unauth(f"TokenReview audiences {status.audiences} do not include {list(self.audiences)}",
                          "token_audience")
        user = status.user
        username = (user.username if user else None) or ""
        groups = (user.groups if user else None) or []
        if not username.startswith(SA_PREFIX) or len(username[len(SA_PREFIX):].split(":")) != 2:
            raise _unauth(f"token belongs to {username!r}, not a service account", "token_identity")
        if SA_GROUP not in groups:
            raise _unauth(f"token user {username!r} is not in group {SA_GROUP}", "token_identity")
        return identity_from_claims({"sub": username})

    async def authenticate(self, token: str) -> Identity:
        if token.count(".") != 2:      # not even a JWT: refused here, without costing the API server a review
            raise _unauth("malformed token: not a JWT (header.payload.signature)", "token_malformed")
        _header(token)
        now = time.monotonic()
        hit = self._cache.get(token)
        if hit and hit[0] > now:
            self._cache.move_to_end(token)
            return hit[1]
        # One review per token at a time: concurrent CSRs from the same pod share the answer.
        pending = self._inflight.get(token)
        if pending is None:
            pending = self._inflight[token] = asyncio.ensure_future(asyncio.to_thread(self.review, token))
            pending.add_done_callback(lambda _f: self._inflight.pop(token, None))
        ident = await asyncio.shield(pending)
        until = now + self.CACHE_SECONDS
        try:   # never cache past the token's own expiry
            exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
            if isinstance(exp, (int, float)):
                until = min(until, now + (exp - time.time()))
        except jwt.InvalidTokenError:
            pass
        self._cache[token] = (until, ident)
        while len(self._cache) > self.CACHE_SIZE:
            self._cache.popitem(last=False)
        return ident


class Chain:
    """Several verifiers in order: the first that accepts wins; otherwise the first refusal is reported."""

    def __init__(self, verifiers: Sequence[Authenticator]) -> None:
        if not verifiers:
            raise ValueError("no token verifier configured")
        self.verifiers = list(verifiers)

    async def authenticate(self, token: str) -> Identity:
        first: Refused | None = None
        for v in self.verifiers:
            try:
                return await v.authenticate(token)
            except Refused as e:
                first = first or e
        assert first is not None
        raise first
