"""One suite over every registered method (PEFT style): counts, frozen base, detach, state, banks."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ctxtune.methods import list_methods, make_method
from ctxtune.model import GPT, ModelConfig

OPTIONS: dict[str, dict[str, Any]] = {
    "hard_prompt": {"tokens": [3, 1, 4]},
    "in_context": {"tokens": [1, 2, 3, 4, 5]},
    "soft_prompt": {"n_virtual": 3},
    "prefix": {"n_virtual": 2},
    "prefix_kv": {"n_virtual": 2},
    "suffix": {"n_virtual": 2},
    "lora": {"rank": 2, "targets": ["q", "k", "v", "o", "mlp_in", "mlp_out"]},
    "full": {},
    "none": {},
}
VARIANTS = [(k, OPTIONS[k]) for k in OPTIONS] + [
    ("prefix_kv", {"n_virtual": 3, "reparam_dim": 8}),
    ("soft_prompt", {"n_virtual": 2, "position_policy": "shift"}),
    ("suffix", {"n_virtual": 2, "position_policy": "shift"}),
    ("prefix", {"n_virtual": 2, "position_policy": "shift"}),
    ("soft_prompt", {"n_virtual": 3, "precompute": True}),
    ("soft_prompt", {"n_virtual": 2, "position_policy": "shift", "precompute": True}),
]
IDS = [f"{k}-{i}" for i, (k, _) in enumerate(VARIANTS)]


def fresh_model(pos: str = "learned") -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layers=2, n_heads=4, d_model=32, n_ctx=40, pos=pos)).double().eval()


def closed_form(key: str, cfg: ModelConfig, opts: dict[str, Any], K: int = 1) -> int:
    """The documented formulas, written out independently of the method classes."""
    L, d, H, dh = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.head_dim
    P = opts.get("n_virtual", 0)
    if key in ("hard_prompt", "in_context", "none"):
        return 0
    if key in ("soft_prompt", "suffix"):
        return K * P * d
    if key == "prefix":
        return K * L * P * d
    if key == "prefix_kv":
        w = 2 * L * H * dh
        h = opts.get("reparam_dim", 0)
        return K * (P * w if h == 0 else P * d + d * h + h + h * w + w)
    if key == "lora":
        r, m = opts["rank"], cfg.mlp_dim
        size = {"q": d + H * dh, "k": d + H * dh, "v": d + H * dh, "o": H * dh + d, "mlp_in": d + m, "mlp_out": m + d}
        return K * L * sum(r * size[t] for t in opts["targets"])
    if key == "full":
        return sum(p.numel() for p in GPT(cfg).parameters())
    raise AssertionError(key)


def test_every_registered_method_is_covered() -> None:
    assert set(list_methods()) == set(OPTIONS)


@pytest.mark.parametrize(("key", "opts"), VARIANTS, ids=IDS)
def test_trainable_count_matches_closed_form(key: str, opts: dict[str, Any]) -> None:
    model = fresh_model()
    method = make_method(key, model, **opts)
    assert method.num_trainable() == method.expected_num_trainable() == closed_form(key, model.cfg, opts)
    if method.supports_bank:
        bank = make_method(key, fresh_model(), n_adapters=3, **opts)
        assert bank.num_trainable() == bank.expected_num_trainable() == closed_form(key, model.cfg, opts, K=3)


def test_paper_section6_budgets_match() -> None:
    """Prefix P=12 on 4 layers x d=256 and rank-1 LoRA on o, mlp_in, mlp_out both have 12,288 parameters."""
    cfg = ModelConfig(n_layers=4, n_heads=4, d_model=256, n_ctx=40)
    assert make_method("prefix", GPT(cfg), n_virtual=12).num_trainable() == 12_288
    assert make_method("lora", GPT(cfg), rank=1).num_trainable() == 12_288


@pytest.mark.parametrize(("key", "opts"), VARIANTS, ids=IDS)
def test_training_leaves_base_bit_identical_and_detach_restores_logits(key: str, opts: dict[str, Any]) -> None:
    model = fresh_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    tokens = torch.randint(0, 10, (4, 20))
    base_logits = model(tokens)
    method = make_method(key, model, **opts).double()
    params = method.trainable_parameters()
    if params:
        opt = torch.optim.AdamW(params, lr=1e-2)
        for _ in range(2):
            method(tokens[:, :-1], n_prompt=10).square().mean().backward()
            opt.step()
            opt.zero_grad()
        changed = not torch.allclose(method(tokens, n_prompt=10), base_logits)
        assert changed, "training must change the adapted logits"
    if key != "full":
        for n, p in model.named_parameters():  # LoRA wraps layers: strip the wrapper's ".base"
            assert torch.equal(p, before[n.replace(".base.", ".")]), f"base parameter {n} changed"
    method.detach()
    assert torch.equal(model(tokens), base_logits)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
        assert p.requires_grad == flags[n], "detach restores requires_grad"


@pytest.mark.parametrize(("key", "opts"), VARIANTS, ids=IDS)
def test_initial_effect(key: str, opts: dict[str, Any]) -> None:
    """Weight methods start at the identity; context methods always change the logits."""
    model = fresh_model()
    tokens = torch.randint(0, 10, (2, 20))
    base = model(tokens)
    adapted = make_method(key, model, **opts).double()(tokens, n_prompt=10)
    if key in ("lora", "full", "none"):  # weight methods start at the identity; "none" is the identity
        assert torch.allclose(adapted, base, atol=1e-12)
    else:
        assert not torch.allclose(adapted, base)


@pytest.mark.parametrize(("key", "opts"), VARIANTS, ids=IDS)
def test_state_roundtrip_through_safetensors(key: str, opts: dict[str, Any], tmp_path: Any) -> None:
    from ctxtune.io import load_tensors, save_tensors

    model = fresh_model()
    tokens = torch.randint(0, 10, (2, 20))
    method = make_method(key, model, **opts).double()
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
    expected = method(tokens, n_prompt=10)
    save_tensors(tmp_path / "a.safetensors", method.adapter_state())
    state = load_tensors(tmp_path / "a.safetensors")
    if key == "full":
        method.detach()
        method = make_method(key, model).double()
    else:
        method.detach()
        method = make_method(key, model, **opts).double()
    method.load_adapter_state(state)
    assert torch.equal(method(tokens, n_prompt=10), expected)


@pytest.mark.parametrize(
    ("key", "opts"), [v for v in VARIANTS if v[0] != "full"], ids=[i for i in IDS if "full" not in i]
)
def test_bank_routes_each_example_to_its_adapter(key: str, opts: dict[str, Any]) -> None:
    if key == "none":
        pytest.skip("no adaptation: every adapter of a bank is the same identity")
    model = fresh_model()
    bank = make_method(key, model, n_adapters=3, **opts).double()
    gen = torch.Generator().manual_seed(5)
    for k in range(3):
        bank.init_adapter(k, gen)
    if key in ("hard_prompt", "in_context"):
        for k in range(3):
            bank.set_prompt(k, torch.randint(0, 10, bank.prompt_tokens.shape[1:], generator=gen))
    if key == "lora":
        with torch.no_grad():
            for B in bank.B.values():
                B.normal_()
    tokens = torch.randint(0, 10, (6, 20))
    ids = torch.tensor([0, 1, 2, 2, 1, 0])
    routed = bank(tokens, ids, n_prompt=10)
    for k in range(3):
        rows = (ids == k).nonzero().flatten()
        alone = bank(tokens[rows], torch.full((len(rows),), k), n_prompt=10)
        assert torch.allclose(routed[rows], alone, atol=1e-12)
    assert not torch.allclose(routed[0], bank(tokens[:1], torch.tensor([1]), n_prompt=10)[0])


@pytest.mark.parametrize(("key", "opts"), VARIANTS, ids=IDS)
@pytest.mark.parametrize("pos", ["learned", "rotary"])
def test_greedy_generation_equals_teacher_forced_argmax(key: str, opts: dict[str, Any], pos: str) -> None:
    model = fresh_model(pos)
    method = make_method(key, model, **opts).double()
    prompt = torch.randint(0, 10, (5, 10))
    generated = method.generate(prompt, 8)
    full = torch.cat([prompt, generated], dim=1)
    logits = method(full, n_prompt=10)
    assert torch.equal(logits[:, 9:17].argmax(-1), generated)


def test_suffix_cannot_change_the_input_positions_but_prefix_can() -> None:
    model = fresh_model()
    tokens = torch.randint(0, 10, (2, 20))
    base = model(tokens)
    suffix = make_method("suffix", model, n_virtual=2).double()
    out = suffix(tokens, n_prompt=10)
    assert torch.equal(out[:, :9], base[:, :9]) and not torch.allclose(out[:, 9:], base[:, 9:])
    suffix.detach()
    prefix = make_method("prefix", model, n_virtual=2).double()
    assert not torch.allclose(prefix(tokens, n_prompt=10)[:, :9], base[:, :9])


@pytest.mark.parametrize(
    ("key", "bad", "match"),
    [
        ("prefix", {"n_virtual": 0}, "positive integer"),
        ("soft_prompt", {"n_virtual": -2}, "positive integer"),
        ("prefix", {"position_policy": "left"}, "position_policy"),
        ("lora", {"rank": 100}, "exceeds the width"),
        ("lora", {"targets": ["qq"]}, "unknown LoRA target"),
        ("hard_prompt", {"tokens": [1, 10]}, "token ids"),
        ("prefix", {"colour": 1}, "unknown prefix key"),
    ("prefix", {"n_virtual": "two"}, "prefix.n_virtual must be int"),
    ("lora", {"rank": 1.5}, "lora.rank must be int"),
        ("nope", {}, "unknown method"),
    ],
)
def test_bad_options_are_config_errors(key: str, bad: dict[str, Any], match: str) -> None:
    from ctxtune.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        make_method(key, fresh_model(), **bad)


@pytest.mark.parametrize("policy", ["keep", "shift"])
@pytest.mark.parametrize("pos", ["learned", "rotary"])
def test_precomputed_soft_prompt_is_the_spliced_computation(policy: str, pos: str) -> None:
    """Running the virtual tokens once and feeding their keys/values as a prefix is exact (float64), for one
    adapter and for a bank, in training and in KV-cached decoding; the gradients agree too."""
    model = fresh_model(pos)
    tokens = torch.randint(0, 10, (6, 9), generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([0, 1, 2, 0, 1, 2])
    plain = make_method("soft_prompt", model, 3, n_virtual=4, position_policy=policy).double()
    fast = make_method("soft_prompt", model, 3, n_virtual=4, position_policy=policy, precompute=True).double()
    fast.load_adapter_state(plain.adapter_state())
    a, b = plain(tokens, ids), fast(tokens, ids)
    assert torch.allclose(a, b, atol=1e-12, rtol=0)
    a.square().sum().backward()
    b.square().sum().backward()
    assert torch.allclose(plain.virtual.grad, fast.virtual.grad, atol=1e-10)
    assert torch.equal(plain.generate(tokens[:, :5], 4, ids), fast.generate(tokens[:, :5], 4, ids))


def test_precompute_is_refused_for_a_suffix() -> None:
    from ctxtune.errors import ConfigError

    with pytest.raises(ConfigError, match="precompute does not apply"):
        make_method("suffix", fresh_model(), n_virtual=2, precompute=True)
