"""A hostile site's own code: on its PYTHONPATH, Python runs this at every start, in the SuperNode
and in each ClientApp process it spawns. When florist's ClientApp is imported, its replies are
changed after they are made, one way per message:

- train, round 1: no chain-length;
- train, round 2: the first B factor's .npy header claims 2^20 x 2^20 float32 (4 TiB) over its few bytes;
- evaluate, round 0: test_loss = 1000, whose exp overflows;
- evaluate, the last round: the status "[/]", which a console reading markup cannot print.

The node trains and evaluates for real; only what it sends is broken.
"""

import io

from patch_on_import import patch_on_import

TARGET = "florist.federation.client_app"


def _claiming_huge(array):
    import numpy as np
    from flwr.app import Array

    stream = io.BytesIO(array.data)
    version = np.lib.format.read_magic(stream)
    (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(stream)
    values = array.data[stream.tell():]
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (2**20, 2**20)})
    return Array(dtype=array.dtype, shape=tuple(array.shape), stype=array.stype, data=header.getvalue() + values)


def _break(reply, status, server_round):
    content = reply.content
    if status == "trained" and server_round == 1:
        del content["metrics"]["chain-length"]
    elif status == "trained" and server_round == 2:
        record = content["adapter"]
        key = next(key for key in record if key.endswith(".B"))
        record[key] = _claiming_huge(record[key])
    elif status == "evaluated" and server_round == 0:
        content["metrics"]["test_loss"] = 1000.0
    elif status == "evaluated":
        content["identity"]["status"] = "[/]"
    return reply


def _install(module):
    honest = module._reply

    def _reply(msg, workspace, status, metrics, adapter=None, dense=None):
        return _break(honest(msg, workspace, status, metrics, adapter, dense), status, metrics["round"])

    module._reply = _reply


patch_on_import(TARGET, _install)
