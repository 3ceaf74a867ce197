"""CA signing throughput and latency: 50 concurrent grpc.aio clients over TLS against `python -m ca`.

The CA runs as its own process pinned to one core (CPU 0); the clients run in separate processes pinned to the
other cores, so they do not measure themselves. CSRs and tokens are made up front and reused, but the CA still
verifies the token, checks and verifies each CSR, and signs a fresh certificate for every request.
Targets: >= 300 signs/s on one core, p99 <= 50 ms, for ECDSA P-256 and RSA-2048 leaf keys. Two runs each:
closed loop (every client sends again as soon as it is answered: the CA's saturation throughput, where latency is
just clients / throughput) and paced (the 50 clients together send the 300/s target rate: latency at that load).
Ratios > 1 are better than the target.

    .venv/bin/python bench/ca.py [--seconds 5] [--clients 50] [--procs 2]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FLOOR_SIGNS_PER_S = 300.0
CEILING_P99_MS = 50.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client_proc(port: int, root: str, csrs: list[str], tokens: list[str], inflight: int, warmup: float,
                seconds: float, cpus: set[int], out: mp.Queue, per_client_rate: float = 0.0) -> None:
    """One client process: `inflight` concurrent loops on one channel; latencies of the measured window.

    per_client_rate 0 = closed loop (each client sends its next request as soon as the last is answered);
    otherwise each client sends on a fixed schedule of that many requests per second (open loop).
    """
    if cpus:
        os.sched_setaffinity(0, cpus)
    import grpc

    from ca import ca_pb2, ca_pb2_grpc
    from meshboot import constants as C

    async def main() -> tuple[list[float], int]:
        ch = grpc.aio.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(root.encode()),
                                     options=[("grpc.ssl_target_name_override", C.ISTIOD_SAN)])
        stub = ca_pb2_grpc.IstioCertificateServiceStub(ch)
        reqs = [ca_pb2.IstioCertificateRequest(csr=c, validity_duration=86400) for c in csrs]
        mds = [(("authorization", f"Bearer {t}"), ("clusterid", "Kubernetes")) for t in tokens]
        await ch.channel_ready()
        start = time.monotonic()
        t_measure, t_end = start + warmup, start + warmup + seconds
        lat: list[float] = []
        errors = 0

        async def loop(i: int) -> None:
            nonlocal errors
            n = i
            interval = 1.0 / per_client_rate if per_client_rate else 0.0
            next_at = start + (i / inflight) * interval
            while True:
                if interval:
                    next_at += interval
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                t0 = time.monotonic()
                if t0 >= t_end:
                    return
                try:
                    resp = await stub.CreateCertificate(reqs[n % len(reqs)], metadata=mds[n % len(mds)], timeout=10)
                    ok = len(resp.cert_chain) == 2
                except grpc.aio.AioRpcError:
                    ok = False
                t1 = time.monotonic()
                if t0 >= t_measure and t1 <= t_end:
                    if ok:
                        lat.append(t1 - t0)
                    else:
                        errors += 1
                n += 1

        await asyncio.gather(*(loop(i) for i in range(inflight)))
        await ch.close()
        return lat, errors

    out.put(asyncio.run(main()))


def run_kind(kind: str, port: int, root: str, issuer, args: argparse.Namespace, server_pid: int,
             rate: float = 0.0) -> dict:
    from meshboot import constants as C
    from meshboot import pki
    idents = [(f"ns{i}", f"sa{i}") for i in range(5)]
    csrs, tokens = [], []
    for i in range(10):
        ns, sa = idents[i % len(idents)]
        key = pki.generate_key(kind)
        csrs.append(pki.csr_pem(pki.make_csr(key, uris=[C.spiffe_id(ns, sa)])).decode())
        tokens.append(issuer.token(ns, sa))
    ncpu = os.cpu_count() or 1
    client_cpus = set(range(1, ncpu)) if ncpu > 1 else set()
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    per = [args.clients // args.procs + (1 if i < args.clients % args.procs else 0) for i in range(args.procs)]
    procs = [ctx.Process(target=client_proc, args=(port, root, csrs, tokens, n, args.warmup, args.seconds,
                                                  client_cpus, q, rate / args.clients)) for n in per]
    for p in procs:
        p.start()
    time.sleep(args.warmup + 0.5)          # process start-up + warm-up, then measure the server's CPU
    cpu0, wall0 = cpu_seconds(server_pid), time.monotonic()
    results = [q.get(timeout=args.seconds + args.warmup + 60) for _ in procs]
    cpu1, wall1 = cpu_seconds(server_pid), time.monotonic()
    for p in procs:
        p.join(10)
    lat = sorted(x for r in results for x in r[0])
    errors = sum(r[1] for r in results)
    if not lat:
        raise SystemExit(f"{kind}: no successful requests ({errors} errors)")
    rate = len(lat) / args.seconds
    cpu_share = (cpu1 - cpu0) / max(1e-9, wall1 - wall0)
    return {"signs_per_s": round(rate, 1), "p50_ms": round(lat[len(lat) // 2] * 1000, 2),
            "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 2), "requests": len(lat),
            "errors": errors, "server_cpu_cores": round(cpu_share, 2),
            "signs_per_cpu_s": round(rate / cpu_share, 1) if cpu_share > 0.05 else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--procs", type=int, default=2)
    args = ap.parse_args()

    from testing.tokens import Issuer
    issuer = Issuer()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ca-"))
    (tmp / "jwks.json").write_text(json.dumps(issuer.jwks()))
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "ca", "--ca-port", str(port), "--ca-address", "127.0.0.1",
         "--ca-dir", str(tmp / "ca"), "--plugin-certs", "", "--jwks", str(tmp / "jwks.json"),
         "--issuer", issuer.issuer, "--ca-monitoring-port", "0"],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
        preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    try:
        line = server.stdout.readline() if server.stdout else ""
        if "serving" not in line:
            raise SystemExit(f"CA did not start: {line!r}")
        root = (tmp / "ca" / "root-cert.pem").read_text()
        figures, paced = {}, {}
        print(f"closed loop: {args.clients} clients, each sends its next CSR when the last is answered")
        for kind in ("ECDSA", "RSA"):
            figures[kind] = r = run_kind(kind, port, root, issuer, args, server.pid)
            print(f"  {kind:5s} leaf keys: {r['signs_per_s']:7.1f} signs/s  p50 {r['p50_ms']:6.2f} ms  "
                  f"p99 {r['p99_ms']:6.2f} ms  ({r['requests']} ok, {r['errors']} errors, server used "
                  f"{r['server_cpu_cores']} cores -> {r['signs_per_cpu_s']} signs per CPU-second)")
        print(f"paced: {args.clients} clients together sending {FLOOR_SIGNS_PER_S:.0f} CSRs/s (the target rate)")
        for kind in ("ECDSA", "RSA"):
            paced[kind] = r = run_kind(kind, port, root, issuer, args, server.pid, rate=FLOOR_SIGNS_PER_S)
            print(f"  {kind:5s} leaf keys: {r['signs_per_s']:7.1f} signs/s  p50 {r['p50_ms']:6.2f} ms  "
                  f"p99 {r['p99_ms']:6.2f} ms  (server used {r['server_cpu_cores']} cores)")
    finally:
        server.terminate()
        server.wait(10)
    worst_rate = min(f["signs_per_s"] for f in figures.values())
    worst_p99 = max(f["p99_ms"] for f in figures.values())
    worst_paced_p99 = max(f["p99_ms"] for f in paced.values())
    print(json.dumps({"bench": "ca", "clients": args.clients, "seconds": args.seconds, "server_cpus": 1,
                      "figures": figures, "paced_at_floor": paced,
                      "floor": {"signs_per_s": FLOOR_SIGNS_PER_S, "p99_ms": CEILING_P99_MS},
                      "ratio": {"signs_per_s": round(worst_rate / FLOOR_SIGNS_PER_S, 2),
                                "p99_at_target_rate": round(CEILING_P99_MS / worst_paced_p99, 2),
                                "p99_at_saturation": round(CEILING_P99_MS / worst_p99, 2)}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
