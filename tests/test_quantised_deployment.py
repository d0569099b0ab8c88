"""Sites that quantise and sites that do not, in one loopback deployment (tests/deployment.py: a
SuperLink and three SuperNodes as processes, TLS and SuperNode authentication on): one site holds
its base in nf4, one in int8, one in full precision, chosen in their own node configs. They agree
with the full-precision server on the base (its unquantised digest), train three rounds of FLoRIST,
and the final adapter loads with peft on the full-precision base."""

from __future__ import annotations

import json

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from deployment import Deployment, still_running
from federations import CLIENT_RANKS, federation_config
from florist.federation.datasets import federated_data
from florist.reporting.run_directory import read_rounds
from test_deployment import RUN_TIMEOUT_SECONDS, site_config, write_config, write_examples

QUANTIZATIONS = ("nf4", "int8", "none")
ROUNDS = 3


def test_an_nf4_an_int8_and_a_full_precision_site_train_three_rounds_of_florist(tiny_model_dir, tmp_path):
    config = federation_config(tiny_model_dir, tmp_path / "run", "florist", f"federation.rounds={ROUNDS}")
    for site, examples in enumerate(federated_data(config).clients):
        write_examples(tmp_path / f"client_{site}.json", examples)
    config_file = write_config(config, tmp_path / "florist.toml")
    processes = []
    with Deployment(tmp_path) as deployment:
        deployment.start_superlink()
        for site, quantization in enumerate(QUANTIZATIONS):
            deployment.add_supernode(f"site{site}", site_config(site, tmp_path, tiny_model_dir, quantization=quantization))
        deployment.wait_for_nodes()
        run_id = deployment.submit({"config-file": str(config_file)})
        status = deployment.wait(run_id, RUN_TIMEOUT_SECONDS)
        log = deployment.log(run_id)
        processes = deployment.processes()
    assert not still_running(processes)
    assert status == "finished:completed", log[-4000:]

    rounds = read_rounds(tmp_path / "run")
    assert [record["round"] for record in rounds] == list(range(ROUNDS + 1))
    for record in rounds[1:]:
        # Every site's reply was accepted: none was refused as a mismatch of the base model.
        assert [client["partition"] for client in record["clients"]] == list(range(len(CLIENT_RANKS))), record.get("events")
    assert rounds[-1]["evaluation"]["test_loss"] != rounds[0]["evaluation"]["test_loss"]

    # final/model is saved in full precision, and the last global adapter loads with peft on the unquantised base.
    saved = json.loads((tmp_path / "run" / "final" / "model" / "config.json").read_text())
    assert saved.get("quantization_config") is None
    final = load_file(tmp_path / "run" / "final" / "model" / "model.safetensors")
    assert all(tensor.dtype == torch.float32 for tensor in final.values())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    pristine = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, tmp_path / "run" / "final" / "adapter").merge_and_unload().state_dict()
    changed = [name for name in pristine if not torch.equal(merged[name], pristine[name])]
    assert changed and all(name.endswith(("q_proj.weight", "v_proj.weight")) for name in changed)
