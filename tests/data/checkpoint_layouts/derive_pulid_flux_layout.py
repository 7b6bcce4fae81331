"""Derive ``pulid_flux_v0.9.1.json`` (this folder) from the official PuLID classes, built on the ``meta`` device.

    python tests/data/checkpoint_layouts/derive_pulid_flux_layout.py --pulid /path/to/PuLID-checkout-or-bare-git

The official ``pulid/encoders_transformer.py`` is read from a checkout (or, for a bare mirror, ``git show
HEAD:...`` into a temporary folder) and imported there; nothing is copied into the pack. ``PuLIDPipeline``'s
``__init__`` (``pulid/pipeline_flux.py``) builds ``IDFormer()`` and ``19 // 2 + 38 // 4`` (+1 for each remainder)
= 20 ``PerceiverAttentionCA()``; ``load_pretrain`` splits the flat file on the first dot and loads each module with
``strict=True``. The key names, shapes and the file's dtype are written out. Development tool only; the tests read
the JSON file.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(os.path.dirname(HERE))
ROOT = os.path.dirname(TESTS)
sys.path[:0] = [ROOT, TESTS]


def derive(repo: str) -> dict:
    from _bootstrap import load_pack

    load_pack(run_init=False)   # the pack as ``likeness``, as the tests see it
    from pulid_support import SOURCE_FILE, official_encoders

    official, commit = official_encoders(repo)
    if official is None:
        raise SystemExit(f"no official PuLID code at {repo}")
    double_interval, single_interval, double, single = 2, 4, 19, 38   # pipeline_flux.PuLIDPipeline.__init__
    count = double // double_interval + single // single_interval
    count += int(double % double_interval != 0) + int(single % single_interval != 0)
    with torch.device("meta"):
        modules = {"pulid_encoder": official.IDFormer()}
        modules.update({f"pulid_ca.{i}": official.PerceiverAttentionCA() for i in range(count)})
    keys = {}
    for prefix, module in modules.items():
        for key, tensor in module.state_dict().items():
            keys[f"{prefix}.{key}"] = {"shape": list(tensor.shape), "dtype": "bfloat16"}
    numel = sum(int(torch.Size(s["shape"]).numel()) for s in keys.values())
    return {
        "source": f"ToTheBeginning/PuLID@{commit} {SOURCE_FILE}:IDFormer (pulid_encoder), "
                  f"{SOURCE_FILE}:PerceiverAttentionCA x {count} (pulid_ca.0..{count - 1}) as built by "
                  "pulid/pipeline_flux.py:PuLIDPipeline.__init__",
        "format_notes": "Container: flat safetensors, keys '<module>.<state-dict key>'. PuLIDPipeline.load_pretrain "
                        "splits on the first dot and loads 'pulid_encoder' (IDFormer(dim=1024, depth=10, dim_head=64, "
                        "heads=16, num_id_token=5, num_queries=32, output_dim=2048, ff_mult=4)) and 'pulid_ca' "
                        "(ModuleList of PerceiverAttentionCA(dim=3072, dim_head=128, heads=16, kv_dim=2048)) with "
                        "strict=True. CA index i serves double blocks 0,2,..,18 (i=0..9) then single blocks "
                        "0,4,..,36 (i=10..19) (flux/model.py). v0.9.0 and v0.9.1 share this layout.",
        "released_as": "HF guozinan/PuLID: pulid_flux_v0.9.1.safetensors (also pulid_flux_v0.9.0.safetensors)",
        "dtype_basis": "inferred: bf16 x param_count = 1.142 GB, the listed file size (the pipeline casts to bf16)",
        "param_count": numel,
        "bytes_estimate": numel * 2,
        "ca_schedule": {"double_interval": double_interval, "single_interval": single_interval,
                        "double_blocks": double, "single_blocks": single, "count": count},
        "groups": {"": keys},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pulid", required=True, help="ToTheBeginning/PuLID checkout or bare git repository")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    layout = derive(args.pulid)
    out = os.path.join(HERE, "pulid_flux_v0.9.1.json")
    with open(out, "w") as handle:
        json.dump(layout, handle, indent=1)
        handle.write("\n")
    logging.info("wrote %s: %d tensors, %s parameters", out, len(layout["groups"][""]), f"{layout['param_count']:,}")


if __name__ == "__main__":
    main()
