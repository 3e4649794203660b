"""PEFT LoRA adapter folders read as ctxtune's LoRA: the same logits as PEFT, and a clear refusal for what
does not map (ctxtune.hf.adapters)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from byom_models import peft, train_peft, transformers  # noqa: E402

from ctxtune.errors import CtxtuneError  # noqa: E402
from ctxtune.hf.adapters import peft_adapter_method  # noqa: E402
from ctxtune.hf.backbone import load_backbone  # noqa: E402

pytestmark = pytest.mark.hf
TOKENS = torch.randint(3, 48, (3, 10), generator=torch.Generator().manual_seed(7))


def peft_logits(base: Path, adapter: Path, dtype: torch.dtype) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    pm = peft.PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        return pm(input_ids=TOKENS).logits[:, -TOKENS.shape[1] :]  # prompt tuning returns its virtual rows too


def ours(base: Path, adapter: Path, dtype: torch.dtype) -> tuple[object, torch.Tensor]:
    method = peft_adapter_method(load_backbone(str(base), dtype), adapter)
    with torch.no_grad():
        return method, method(TOKENS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lora_gives_peft_logits(llama_dir: Path, peft_adapters: dict, dtype: torch.dtype) -> None:
    method, logits = ours(llama_dir, peft_adapters["lora"], dtype)
    assert method.key == "lora" and method.config.rank == 4 and set(method.config.targets) == {"q", "k", "v", "o"}
    assert float(method.B["0_q"].detach().abs().max()) > 0  # trained: not the zero initialisation
    diff = float((logits - peft_logits(llama_dir, peft_adapters["lora"], dtype)).abs().max())
    assert diff < (1e-5 if dtype == torch.float32 else 1e-12), diff
    base = load_backbone(str(llama_dir), dtype)
    with torch.no_grad():
        assert float((base(TOKENS) - logits).abs().max()) > 1e-3  # the adapter changes the logits


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_context_adapters_give_peft_logits(llama_dir: Path, peft_adapters: dict, kind: str) -> None:
    method, logits = ours(llama_dir, peft_adapters[kind], torch.float64)
    assert method.identity == "holds"
    assert float((logits - peft_logits(llama_dir, peft_adapters[kind], torch.float64)).abs().max()) < 1e-10


def test_rank_stabilised_scaling_and_a_regex_target_map_exactly(llama_dir: Path, tmp_path: Path) -> None:
    cfg = peft.LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=r".*\.(q_proj|up_proj)")
    folder = train_peft(llama_dir, cfg, tmp_path / "rs")
    method, logits = ours(llama_dir, folder, torch.float64)
    assert set(method.config.targets) == {"q", "mlp_in"} and method.config.alpha == pytest.approx(6 / 2 * 4)
    assert float((logits - peft_logits(llama_dir, folder, torch.float64)).abs().max()) < 1e-12


def test_gpt2_c_proj_and_c_fc_map(gpt2_dir: Path, tmp_path: Path) -> None:
    folder = train_peft(gpt2_dir, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_proj", "c_fc"],
                                                  fan_in_fan_out=True), tmp_path / "g")
    method, logits = ours(gpt2_dir, folder, torch.float64)
    assert set(method.config.targets) == {"o", "mlp_in", "mlp_out"}
    assert float((logits - peft_logits(gpt2_dir, folder, torch.float64)).abs().max()) < 1e-12


REFUSED = [
    ("lm_head", dict(target_modules=["q_proj", "lm_head"]), "lm_head, which is none of the maps"),
    ("one layer", dict(target_modules=["q_proj"], layers_to_transform=[0]), "does not adapt q in layer 1"),
    ("dora", dict(target_modules=["q_proj"], use_dora=True), "use_dora = True: DoRA"),
    ("bias", dict(target_modules=["q_proj"], bias="lora_only"), "bias = 'lora_only'"),
    ("ranks", dict(target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}), "ranks [2, 4]"),
    ("extra modules", dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
]


@pytest.mark.parametrize("options,message", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_what_does_not_map_is_refused_with_the_reason(llama_dir: Path, tmp_path: Path, options: dict,
                                                     message: str) -> None:
    folder = train_peft(llama_dir, peft.LoraConfig(r=4, lora_alpha=8, **options), tmp_path / "a", steps=1)
    with pytest.raises(CtxtuneError, match=message.replace("[", r"\[").replace("]", r"\]")):
        peft_adapter_method(load_backbone(str(llama_dir)), folder)


def test_gpt2_fused_qkv_is_refused(gpt2_dir: Path, tmp_path: Path) -> None:
    folder = train_peft(gpt2_dir, peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True),
                        tmp_path / "g", steps=1)
    with pytest.raises(CtxtuneError, match=r"adapts transformer\.h\.0\.attn\.c_attn, which is none of the maps"):
        peft_adapter_method(load_backbone(str(gpt2_dir)), folder)


def test_pissa_initialisation_and_pickles_are_refused(llama_dir: Path, peft_adapters: dict, tmp_path: Path) -> None:
    folder = tmp_path / "pissa"
    folder.mkdir()
    cfg = json.loads((peft_adapters["lora"] / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": "pissa"}))
    weights = peft_adapters["lora"] / "adapter_model.safetensors"
    (folder / "adapter_model.safetensors").write_bytes(weights.read_bytes())
    with pytest.raises(CtxtuneError, match="rewrites the base weights"):
        peft_adapter_method(load_backbone(str(llama_dir)), folder)
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(CtxtuneError, match="adapter_model.bin, a pickle"):
        peft_adapter_method(load_backbone(str(llama_dir)), folder)
