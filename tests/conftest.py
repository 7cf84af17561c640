import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def demo_inputs(tmp_path_factory):
    """Tiny SDXL and SD pipelines saved to disk plus reward-labelled preference sets (16 pairs)."""
    from smpo_diffusers.demo import build_demo_inputs

    root = tmp_path_factory.mktemp("demo-inputs")
    sdxl_model, sdxl_data = build_demo_inputs(str(root), family="sdxl", num_pairs=16, seed=0)
    sd_model, sd_data = build_demo_inputs(str(root), family="sd", num_pairs=16, seed=0)
    return {"sdxl": (sdxl_model, sdxl_data), "sd": (sd_model, sd_data)}
