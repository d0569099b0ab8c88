"""What the secure sum (federation/secure_sum) costs against a plain upload, in process, without a model.

For K nodes each holding a FedIT upload of SmolLM2-135M's q_proj and v_proj at one rank (A and B of
30 layers, float64 in memory), it runs the four stages end to end through their Flower records and
reports the wall time of every node's work together and of the server's, and the bytes each node
uploads and downloads, against the float32 payload a plain round uploads. One process, one thread
of numpy; the nodes' work is summed, as if they ran one after another. With --signed each count is
run twice, unsigned and with every node signing its keys and checking every peer's signature
(secure_sum/signing.py; the long-term P-384 node keys are made beforehand, not timed).

    .venv/bin/python benchmarks/secure_sum.py --clients 8 100 --rank 8
    .venv/bin/python benchmarks/secure_sum.py --clients 8 30 --rank 8 --signed
"""

from __future__ import annotations

import argparse
import time

import torch
from cryptography.hazmat.primitives.asymmetric import ec

from florist.federation.secure_sum import (
    EncryptedShares,
    Layout,
    MaskedInput,
    NodeSigning,
    PublicKeys,
    Quantizer,
    SecureSumNode,
    SecureSumServer,
    UnmaskShares,
)
from florist.federation.secure_sum.protocol import ForwardedShares, KeyDirectory, Setup, UnmaskRequest
from florist.federation.secure_sum.server import threshold_for

LAYERS, HIDDEN, KV = 30, 576, 192


def upload(rank: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LAYERS):
        for name, out in (("q", HIDDEN), ("v", KV)):
            tensors[f"{layer}.{name}.A"] = torch.randn(rank, HIDDEN, generator=generator, dtype=torch.float64) * 0.02
            tensors[f"{layer}.{name}.B"] = torch.randn(out, rank, generator=generator, dtype=torch.float64) * 0.002
    return tensors


def signing_material(nodes: list[int]) -> dict[int, NodeSigning]:
    private = {node: ec.generate_private_key(ec.SECP384R1()) for node in nodes}
    trusted = [key.public_key() for key in private.values()]
    return {node: NodeSigning.of(key, trusted) for node, key in private.items()}


def measure(count: int, rank: int, signed: bool = False) -> dict:
    inputs = {node + 1: upload(rank, node) for node in range(count)}
    layout = Layout.of(inputs[1])
    server = SecureSumServer(1, list(inputs), threshold_for(count, 2 / 3, 2), 2, Quantizer(1.0, 20), layout)
    signing = signing_material(list(inputs)) if signed else {}
    nodes = {node: SecureSumNode(node, signing=signing.get(node)) for node in inputs}
    up = dict.fromkeys(inputs, 0)
    down = dict.fromkeys(inputs, 0)
    node_seconds = server_seconds = 0.0

    def timed(work):
        start = time.perf_counter()
        value = work()
        return value, time.perf_counter() - start

    def stage(messages, answer, receive, reader):
        nonlocal node_seconds, server_seconds
        for node, message in messages.items():
            record = message.record()
            down[node] += record.count_bytes()
            reply, seconds = timed(lambda: answer(node, type(message).read(record)).record())
            node_seconds += seconds
            up[node] += reply.count_bytes()
            server_seconds += timed(lambda: receive(node, reader.read(reply)))[1]

    stage({n: server.setup for n in nodes}, lambda n, m: nodes[n].answer_setup(m), server.receive_keys, PublicKeys)
    directory, seconds = timed(server.directory)
    server_seconds += seconds
    stage({n: directory for n in nodes}, lambda n, m: nodes[n].answer_directory(m), server.receive_shares, EncryptedShares)
    forwarded, seconds = timed(server.forwarded)
    server_seconds += seconds
    stage(forwarded, lambda n, m: nodes[n].answer_collect(m, inputs[n]), server.receive_masked, MaskedInput)
    request, seconds = timed(server.unmask_request)
    server_seconds += seconds
    stage({n: request for n in request.survivors}, lambda n, m: nodes[n].answer_unmask(m), server.receive_unmask, UnmaskShares)
    (total, _), seconds = timed(server.result)
    server_seconds += seconds
    plain = {name: sum(inputs[n][name] for n in inputs) for name in total}
    error = max((total[name] - plain[name]).abs().max().item() for name in total)
    return {
        "clients": count, "signed": signed, "values": layout.size, "plain_upload_bytes": 4 * layout.size,
        "secure_upload_bytes": max(up.values()), "secure_download_bytes": max(down.values()),
        "node_seconds_mean": node_seconds / count, "server_seconds": server_seconds, "max_error": error,
        "bound": server.quantizer.bound(count),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 100])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--signed", action="store_true", help="each count unsigned and then signed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| clients | signed | values | plain upload (MB) | secure upload (MB) | secure download (MB) | node s (mean) | server s | max error | bound |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    runs = [(count, signed) for count in args.clients for signed in ((False, True) if args.signed else (False,))]
    for count, signed in runs:
        r = measure(count, args.rank, signed)
        print(
            f"| {r['clients']} | {'yes' if signed else 'no'} | {r['values']} | {r['plain_upload_bytes'] / 1e6:.3f} | {r['secure_upload_bytes'] / 1e6:.3f} | "
            f"{r['secure_download_bytes'] / 1e6:.3f} | {r['node_seconds_mean']:.2f} | {r['server_seconds']:.2f} | {r['max_error']:.2e} | {r['bound']:.2e} |",
            flush=True,
        )

if __name__ == "__main__":
    main()
