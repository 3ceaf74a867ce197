"""pilot-agent's DNS proxy: answers the app's DNS (redirected to 15053 by istio-init's `--redirect-dns` rules) from
the NDS name table and forwards everything else to the pod's nameservers.

`wire.py` DNS messages, `resolver.py` the pure core (NameTable → lookup table → answer or forward), `config.py` env
and resolv.conf, `server.py` the UDP/TCP listeners and upstream forwarding, `service.py` the agent's `start()`.
Nothing is imported here: `agent.dns.config` is read at every start, the rest only with DNS capture on.
"""
