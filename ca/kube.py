"""The Kubernetes API client, imported lazily: a standalone CA that needs no cluster starts without it."""
from __future__ import annotations

from typing import Any


class NoKubernetes(RuntimeError):
    """A flag needs the Kubernetes API but neither in-cluster config nor a kubeconfig is available."""


def api_client() -> Any:
    """In-cluster configuration first (service-account token), then $KUBECONFIG / ~/.kube/config."""
    from kubernetes import client, config  # noqa: PLC0415 - kubernetes only when a flag needs the API
    from kubernetes.config.config_exception import ConfigException  # noqa: PLC0415 - as above

    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)
    except ConfigException:
        try:
            config.load_kube_config(client_configuration=cfg)
        except (ConfigException, OSError) as e:
            raise NoKubernetes("no Kubernetes API: not in a cluster and no usable kubeconfig "
                               f"(needed by --token-review, --ca-secret and --publish-root-cert): {e}") from None
    return client.ApiClient(cfg)


def core_v1(api: Any) -> Any:
    from kubernetes import client  # noqa: PLC0415 - kubernetes only when a flag needs the API
    return client.CoreV1Api(api)


def authentication_v1(api: Any) -> Any:
    from kubernetes import client  # noqa: PLC0415 - kubernetes only when a flag needs the API
    return client.AuthenticationV1Api(api)
