"""NDS: the name table discovery serves to agents with DNS capture on (`istio.networking.nds.v1.NameTable`), built
from the model. Pure: the model in, a NameTable (meshboot/nds.py's value and wire format) and its protobuf out.

Facts from istiod (pkg/dns/server/name_table.go BuildNameTable, pilot/pkg/xds/nds.go; its code is not copied):
- one entry per Service the proxy sees (here every Service: meshboot has no Sidecar/exportTo scoping), keyed by
  `<name>.<namespace>.svc.<cluster domain>`, registry `Kubernetes`, with `shortname` and `namespace` set so the
  agent answers `name`, `name.ns`, `name.ns.svc` itself; `alt_hosts` is never filled (deprecated).
- a Service with a cluster IP answers with it; a headless one (`clusterIP: None`) with at least one port answers
  with its endpoints' pod IPs — ready ones, or all with `publishNotReadyAddresses` (adapt folds that into `ready`),
  each address once; a headless Service without ports or without such endpoints gets no entry.
- the table is one resource with no name, and a push that changes Services sends it again.
Not done: istiod's per-pod entries of headless Services (`<hostname>.<subdomain>.<ns>.svc.<domain>` for pods with
`spec.subdomain`): the model does not carry a pod's hostname or subdomain.

The agent refuses a table over meshboot.nds's bounds (entries, IPs per name, IPs in all) with a NACK and keeps its
old one, so the table built here stays within them: names in hostname order up to the bound, IPs per name cut.
"""
from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

from meshboot import nds
from meshboot.nds import NameInfo, NameTable

from .model import Model, Service

TYPE_URL = nds.TYPE_URL


def _addresses(model: Model, svc: Service) -> tuple[str, ...]:
    """The IPs a Service's name resolves to: its cluster IP, or a headless Service's ready endpoint IPs."""
    if not svc.headless:
        return (svc.cluster_ip,) if svc.cluster_ip else ()
    if not svc.ports:
        return ()
    seen: dict[str, None] = {}
    for ep in model.endpoints_by_service.get(svc.key, ()):
        if ep.ready:
            seen.setdefault(ep.address)
    return tuple(seen)[:nds.MAX_IPS_PER_NAME]


def name_table(model: Model) -> NameTable:
    """The name table for every proxy of this model (the same for all: no per-proxy visibility here)."""
    domain = model.mesh.cluster_domain
    entries: dict[str, NameInfo] = {}
    for svc in model.services:
        ips = _addresses(model, svc)
        if ips:
            entries[svc.fqdn(domain)] = NameInfo(ips, nds.REGISTRY_KUBERNETES, svc.name, svc.namespace)
    table: dict[str, NameInfo] = {}
    total = 0
    for host in sorted(entries):
        ni = entries[host]
        if len(table) >= nds.MAX_ENTRIES or total + len(ni.ips) > nds.MAX_TOTAL_IPS:
            break
        table[host] = ni
        total += len(ni.ips)
    return NameTable(table)


def _message_class() -> type[Message]:
    """istio.networking.nds.v1.NameTable as a protobuf class (field numbers of Istio's nds.proto), in a pool of its
    own: the ADS server's encoder takes protobuf messages."""
    fdp = descriptor_pb2.FileDescriptorProto(name="meshboot/nds.proto", package="istio.networking.nds.v1",
                                             syntax="proto3")
    msg = fdp.message_type.add(name="NameTable")
    info = msg.nested_type.add(name="NameInfo")
    f = descriptor_pb2.FieldDescriptorProto
    for name, num, label in (("ips", 1, f.LABEL_REPEATED), ("registry", 2, f.LABEL_OPTIONAL),
                             ("shortname", 3, f.LABEL_OPTIONAL), ("namespace", 4, f.LABEL_OPTIONAL),
                             ("alt_hosts", 5, f.LABEL_REPEATED)):
        info.field.add(name=name, number=num, label=label, type=f.TYPE_STRING)
    entry = msg.nested_type.add(name="TableEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, label=f.LABEL_OPTIONAL, type=f.TYPE_STRING)
    entry.field.add(name="value", number=2, label=f.LABEL_OPTIONAL, type=f.TYPE_MESSAGE,
                    type_name=".istio.networking.nds.v1.NameTable.NameInfo")
    msg.field.add(name="table", number=1, label=f.LABEL_REPEATED, type=f.TYPE_MESSAGE,
                  type_name=".istio.networking.nds.v1.NameTable.TableEntry")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("istio.networking.nds.v1.NameTable"))


NameTableMessage = _message_class()


def resources(model: Model) -> dict[str, Message]:
    """What Served hands the ADS server for NDS: one resource, named "" as istiod sends it (no name)."""
    return {"": NameTableMessage.FromString(nds.encode(name_table(model)))}
