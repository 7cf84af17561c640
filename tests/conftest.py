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


@pytest.fixture(scope="session")
def toy_pairs(tmp_path_factory):
    """The toy world's default preference set (192 pairs, what ``--demo`` and ``toy_alignment.py --quick`` build:
    one pair per caption, seed 0), built once per session (~25 s); tests copy it where the code looks for it."""
    from smpo_diffusers.toy import build_toy_preferences

    folder = str(tmp_path_factory.mktemp("toy-pairs") / "pairs")
    build_toy_preferences(folder, pairs_per_caption=1, seed=0)
    return folder


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons (precision, device, gradient state); each test gets new ones,
    as each training process does in real use."""
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(autouse=True)
def restore_library_log_level():
    """Scripts' main() quiets the library's logger (benchmarks/, the CLIs); later tests read its records."""
    import logging

    logger = logging.getLogger("smpo_diffusers")
    level = logger.level
    yield
    logger.setLevel(level)
