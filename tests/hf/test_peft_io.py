"""PEFT adapters (prefix tuning, prompt tuning) made with peft itself, saved, read back as ctxtune methods."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from ctxtune.errors import CtxtuneError
from ctxtune.hf import HFBackbone, load_peft_adapter, peft_method
from ctxtune.theory import capture_method, check_layers

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.hf


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_peft_roundtrip(request: pytest.FixtureRequest, name: str, kind: str, tmp_path: object) -> None:
    base = request.getfixturevalue(name)
    cfg = (peft.PrefixTuningConfig if kind == "prefix" else peft.PromptTuningConfig)(
        task_type="CAUSAL_LM", num_virtual_tokens=3
    )
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for p in pm.prompt_encoder.parameters():
            p.normal_(generator=torch.Generator().manual_seed(0))
    pm.eval()
    pm.save_pretrained(tmp_path)
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = pm(input_ids=ids).logits[:, -6:]
        plain = base(input_ids=ids).logits
    adapter = load_peft_adapter(tmp_path)  # type: ignore[arg-type]
    assert adapter.method == ("prefix_kv" if kind == "prefix" else "soft_prompt")
    method = peft_method(HFBackbone(copy.deepcopy(base)).eval(), adapter)
    with torch.no_grad():
        ours = method(ids)
    assert (ref - plain).abs().max() > 1e-4  # the adapter does something
    assert torch.allclose(ours, ref, atol=1e-5)
    assert all(r.ok for r in check_layers(capture_method(method, ids)))


def test_peft_errors(tmp_path: object, tiny_llama: torch.nn.Module) -> None:
    with pytest.raises(CtxtuneError, match="not a PEFT adapter"):
        load_peft_adapter(tmp_path)  # type: ignore[arg-type]
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')  # type: ignore[operator]
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")  # type: ignore[operator]
    with pytest.raises(CtxtuneError, match="not a context method"):
        load_peft_adapter(tmp_path)  # type: ignore[arg-type]
