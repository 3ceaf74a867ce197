"""meshboot-iptables / istio-iptables: the init container that installs Istio's capture rules in the pod's netns.

Pure core: flags -> CaptureConfig (config) -> RuleSets (rules) -> restore/replace/cleanup texts (state).
Thin shell: backend (iptables binaries), netinfo (addresses, netlink), apply (all-or-nothing), validation, cli.
"""
