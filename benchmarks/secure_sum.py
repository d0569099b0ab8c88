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


STAGES = ("setup", "shares", "collect", "unmask")
"""The protocol's four round trips: public keys, encrypted Shamir shares, the masked input, unmasking shares."""


def run_protocol(inputs: dict[int, dict[str, torch.Tensor]], quantizer: Quantizer, clock=time.perf_counter, signing: dict[int, NodeSigning] | None = None) -> dict:
    """The secure sum of `inputs` (node id -> its tensors), every message through its Flower record.

    Per stage: `node_seconds` (all nodes' work together, as if one after another), `server_seconds`,
    and each node's bytes up and down (`up`, `down`: node id -> bytes); `clock` is what times them;
    `signing`: each node's signing material (None: unsigned keys). Also the
    dequantised sum's largest difference from the plain sum (`max_error`) and its bound."""
    count = len(inputs)
    layout = Layout.of(next(iter(inputs.values())))
    server = SecureSumServer(1, list(inputs), threshold_for(count, 2 / 3, 2), 2, quantizer, layout)
    nodes = {node: SecureSumNode(node, signing=(signing or {}).get(node)) for node in inputs}
    stages = {name: {"node_seconds": 0.0, "server_seconds": 0.0, "up": dict.fromkeys(inputs, 0), "down": dict.fromkeys(inputs, 0)} for name in STAGES}

    def timed(work):
        start = clock()
        value = work()
        return value, clock() - start

    def stage(name, messages, answer, receive, reader, then):
        cost = stages[name]
        for node, message in messages.items():
            record = message.record()
            cost["down"][node] += record.count_bytes()
            reply, seconds = timed(lambda: answer(node, type(message).read(record)).record())
            cost["node_seconds"] += seconds
            cost["up"][node] += reply.count_bytes()
            cost["server_seconds"] += timed(lambda: receive(node, reader.read(reply)))[1]
        value, seconds = timed(then)
        cost["server_seconds"] += seconds
        return value

    directory = stage("setup", {n: server.setup for n in nodes}, lambda n, m: nodes[n].answer_setup(m), server.receive_keys, PublicKeys, server.directory)
    forwarded = stage("shares", {n: directory for n in nodes}, lambda n, m: nodes[n].answer_directory(m), server.receive_shares, EncryptedShares, server.forwarded)
    request = stage("collect", forwarded, lambda n, m: nodes[n].answer_collect(m, inputs[n]), server.receive_masked, MaskedInput, server.unmask_request)
    total, _ = stage("unmask", {n: request for n in request.survivors}, lambda n, m: nodes[n].answer_unmask(m), server.receive_unmask, UnmaskShares, server.result)
    plain = {name: sum(inputs[n][name].double() for n in inputs) for name in total}
    return {
        "clients": count, "values": layout.size, "total": total,
        "stages": stages,
        "max_error": max((total[name] - plain[name]).abs().max().item() for name in total),
        "bound": quantizer.bound(count),
    }


def measure(count: int, rank: int, signed: bool = False) -> dict:
    inputs = {node + 1: upload(rank, node) for node in range(count)}
    run = run_protocol(inputs, Quantizer(1.0, 20), signing=signing_material(list(inputs)) if signed else None)
    stages = run["stages"].values()
    return {
        "clients": count, "signed": signed, "values": run["values"], "plain_upload_bytes": 4 * run["values"],
        "secure_upload_bytes": max(sum(s["up"][node] for s in stages) for node in inputs),
        "secure_download_bytes": max(sum(s["down"][node] for s in stages) for node in inputs),
        "node_seconds_mean": sum(s["node_seconds"] for s in stages) / count, "server_seconds": sum(s["server_seconds"] for s in stages),
        "max_error": run["max_error"], "bound": run["bound"],
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
