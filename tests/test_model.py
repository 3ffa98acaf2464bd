"""Behaviour of our network where upstream is wrong or unspecified: batching, determinism, depth, config."""

import copy

import pytest
import torch

import moceir
from moceir.models import MoCEConfig, get_config
from moceir.models.experts import set_expert_bypass

from conftest import fill_deterministic, moe_layer_outputs, routed_tiny


@pytest.fixture(scope="module")
def mixed_batch():
    g = torch.Generator().manual_seed(0)
    return torch.rand(8, 3, 32, 32, generator=g) * torch.rand(8, 3, 1, 1, generator=g)


@pytest.fixture(scope="module")
def routed_model(mixed_batch):
    """Tiny model whose routers send image b of `mixed_batch` to expert (b + layer) % 4 (conftest.routed_tiny)."""
    return routed_tiny(mixed_batch)


@pytest.mark.parametrize("dispatch", ["dense", "sparse", "conditional"])
def test_batch_equals_per_image_with_different_experts(routed_model, mixed_batch, dispatch):
    routed_model.set_dispatch(dispatch)
    with torch.no_grad():
        batch = routed_model(mixed_batch, return_aux=True)
        single = [routed_model(x[None], return_aux=True) for x in mixed_batch]
    layers = moe_layer_outputs(routed_model, mixed_batch)
    single_layers = [moe_layer_outputs(routed_model, x[None]) for x in mixed_batch]
    routed_model.set_dispatch("auto")
    experts = batch.experts
    assert all(len(set(layer.tolist())) == 4 for layer in experts), "the batch must exercise every expert"
    assert torch.isfinite(batch.image).all()
    with torch.no_grad():
        bypassed = set_expert_bypass(routed_model)(mixed_batch)
    set_expert_bypass(routed_model, False)
    assert (batch.image - bypassed).abs().max() > 0.01  # the 1e-5 below is far below what the experts do
    for i, (s, s_layers) in enumerate(zip(single, single_layers)):
        assert (s.experts[:, 0] == experts[:, i]).all()
        assert (batch.image[i] - s.image[0]).abs().max() <= 1e-5
        for out, s_out in zip(layers, s_layers):
            assert (out[i] - s_out[0]).abs().max() <= 1e-5 * max(1.0, out.abs().max())


def test_the_three_dispatches_give_one_output(routed_model, mixed_batch):
    """Compared where the experts act: the MoE layers' outputs, against what bypassing the experts changes."""
    outs = {}
    for mode in ("dense", "sparse", "conditional", "bypass"):
        set_expert_bypass(routed_model, mode == "bypass")
        routed_model.set_dispatch("dense" if mode == "bypass" else mode)
        outs[mode] = moe_layer_outputs(routed_model, mixed_batch)
    set_expert_bypass(routed_model, False)
    routed_model.set_dispatch("auto")
    branch = max((a - b).abs().max() for a, b in zip(outs["dense"], outs["bypass"]))
    assert branch > 0.05, branch  # the experts' branches are large enough to tell a wrong dispatch
    for mode in ("sparse", "conditional"):
        assert max((a - b).abs().max() for a, b in zip(outs[mode], outs["dense"])) <= 1e-5 * branch, mode


def test_dense_and_sparse_dispatch_agree_in_training(routed_model, mixed_batch):
    model = routed_model.train()
    outs = {}
    for mode in ("dense", "sparse"):
        model.set_dispatch(mode)
        torch.manual_seed(3)
        out = model(mixed_batch)
        out.image.mean().add(out.balance_loss).backward()
        grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        outs[mode] = (out, grads)
    model.eval().set_dispatch("auto")
    (a, ga), (b, gb) = outs["dense"], outs["sparse"]
    assert (a.image - b.image).abs().max() <= 1e-5
    assert torch.allclose(a.balance_loss, b.balance_loss)
    for n in ga:
        assert torch.allclose(ga[n], gb[n], atol=1e-5, rtol=1e-4), n


def test_eval_is_deterministic_by_default(routed_model, mixed_batch):
    with torch.no_grad():
        torch.manual_seed(1)
        a = routed_model(mixed_batch)
        torch.manual_seed(2)
        b = routed_model(mixed_batch)
    assert torch.equal(a, b)


def test_upstream_eval_noise_is_an_explicit_option(routed_model, mixed_batch):
    routed_model.eval_router_noise = True
    try:
        with torch.no_grad():
            torch.manual_seed(1)
            a = routed_model(mixed_batch, return_aux=True)
            torch.manual_seed(2)
            b = routed_model(mixed_batch, return_aux=True)
    finally:
        routed_model.eval_router_noise = False
    assert not torch.equal(a.experts, b.experts) or not torch.equal(a.image, b.image)


def test_expert_depth_computed_once_equals_upstream_loop():
    deep = moceir.create_model("MoCE_IR_tiny", stage_depth=(3, 3, 3))
    fill_deterministic(deep, 0.3)
    expert = deep.dec[0][2].layers[0].adapter.expert(3)
    x, s = torch.randn(2, 32, 8, 8), torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        upstream = None
        for _ in range(3):  # upstream: `for _ in range(depth): feat = process(feats, shared)`
            upstream = expert(x, s)
        assert torch.equal(expert(x, s), upstream)


def test_training_returns_balance_loss_and_routing():
    model = moceir.create_model("MoCE_IR_tiny").train()
    out = model(torch.rand(4, 3, 16, 16))
    assert out.image.shape == (4, 3, 16, 16)
    assert out.balance_loss.ndim == 0 and out.balance_loss.item() > 0
    assert out.experts.shape == (3, 4)
    model.eval()
    with torch.no_grad():
        y = model(torch.rand(1, 3, 16, 16))
    assert isinstance(y, torch.Tensor)


def test_presets_and_overrides():
    assert sum(p.numel() for p in moceir.create_model("MoCE_IR_S").parameters()) == 11_477_752
    assert sum(p.numel() for p in moceir.create_model("MoCE_IR").parameters()) == 25_353_796
    cfg = get_config("MoCE_IR_S", dim=16, topk=2)
    assert cfg.dim == 16 and cfg.topk == 2 and get_config("MoCE_IR_S").dim == 32
    with pytest.raises(Exception):
        cfg.dim = 8  # frozen


def test_unknown_names_list_the_valid_choices():
    with pytest.raises(KeyError, match="MoCE_IR_S"):
        moceir.create_model("MoCE_IR_XL")
    with pytest.raises(TypeError, match="valid fields"):
        get_config("MoCE_IR_S", dimm=3)
    with pytest.raises(ValueError, match="heads"):
        MoCEConfig(dim=8, heads=(3, 1, 1, 1))
    with pytest.raises(ValueError, match="dispatch"):
        moceir.create_model("MoCE_IR_tiny").set_dispatch("fast")
    with pytest.raises(ValueError, match="fft_impl must be one of"):
        moceir.create_model("MoCE_IR_tiny").set_fft_impl("fast")


def test_input_size_must_be_multiple_of_8():
    model = moceir.create_model("MoCE_IR_tiny").eval()
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.rand(1, 3, 20, 16))


def test_dense_dispatch_under_bf16_autocast(routed_model, mixed_batch):
    """Gates come out of an fp32 softmax while logits are bf16 under autocast; dense dispatch must mix them."""
    model = routed_model.set_dispatch("dense")
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(mixed_batch[:2])
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(mixed_batch[:2])
        out.image.float().mean().backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.eval().set_dispatch("auto")
    assert torch.isfinite(y.float()).all()


@pytest.mark.parametrize("training", [False, True])
def test_dense_dispatch_compiles_to_one_graph(training):
    """No host synchronisation under dense dispatch: torch.compile sees one graph (so CUDA graphs can apply)."""
    model = moceir.create_model("MoCE_IR_tiny").set_dispatch("dense").train(training)
    with torch.set_grad_enabled(training):
        explained = torch._dynamo.explain(model)(torch.rand(2, 3, 16, 16))
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_channels_last_layer_norm_takes_the_faster_path_per_device_and_both_agree(monkeypatch):
    from moceir.models import layers

    # CUDA's fused kernel is slow below 128 channels (benchmarks/layernorm_speed.py, window 3); the CPU's is not
    assert [layers.fused_layer_norm_pays("cuda", c) for c in (32, 64, 128, 256)] == [False, False, True, True]
    assert all(layers.fused_layer_norm_pays("cpu", c) for c in (32, 64, 128, 256))
    torch.manual_seed(0)
    norm = layers.LayerNorm2d(32)
    with torch.no_grad():
        norm.body.weight.uniform_(0.5, 1.5)
        norm.body.bias.uniform_(-0.2, 0.2)
    x = (3 * torch.randn(2, 32, 9, 7) + 1).contiguous(memory_format=torch.channels_last)
    fused = norm(x)
    monkeypatch.setattr(layers, "fused_layer_norm_pays", lambda device_type, channels: False)
    manual = norm(x)
    assert torch.allclose(fused, manual, atol=2e-6, rtol=0) and manual.shape == x.shape
    assert torch.allclose(manual, norm(x.contiguous()), atol=1e-6, rtol=0)  # the NCHW path's formula


@pytest.mark.parametrize("channels_last", [False, True])
def test_dense_dispatch_with_merged_projections_is_the_gated_sum_of_the_experts(channels_last):
    """MoCEAdapter._dense merges the experts' 1x1 projections; it must equal sum_i w_i * expert_i(x, s) for any
    gates (two experts per image here, gates not summing to 1), values and gradients."""
    from moceir.models.router import RouterOutput

    model = moceir.create_model("MoCE_IR_tiny")
    fill_deterministic(model, 0.1)
    adapter = model.adapters[0]
    g = torch.Generator().manual_seed(3)
    c = adapter.proj_out.in_channels
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, c, 16, 16, generator=g).contiguous(memory_format=fmt).requires_grad_()
    s = torch.randn(3, c, 16, 16, generator=g).contiguous(memory_format=fmt)
    indices = torch.tensor([[0, 3], [2, 1], [3, 2]])
    gates = torch.tensor([[0.7, 0.5], [0.2, 0.9], [1.0, 0.3]])
    route = RouterOutput(indices, gates, torch.zeros(3, 4), torch.zeros(()))
    merged = adapter._dense(x, s, route)
    w = adapter._gate_matrix(route)
    reference = sum(adapter.expert(i)(x, s) * w[:, i].view(-1, 1, 1, 1) for i in range(4))
    torch.testing.assert_close(merged, reference, rtol=1e-5, atol=1e-6)
    (gm,) = torch.autograd.grad(merged.square().sum(), x)
    (gr,) = torch.autograd.grad(reference.square().sum(), x)
    torch.testing.assert_close(gm, gr, rtol=1e-4, atol=1e-5)


def test_a_nan_image_does_not_reach_the_others_under_dense_dispatch():
    """The merged dense dispatch mixes experts, never images: a NaN in one image stays in that image."""
    model = moceir.create_model("MoCE_IR_tiny").eval().set_dispatch("dense")
    fill_deterministic(model, 0.1)
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    x[1, :, :2, :2] = float("nan")
    with torch.no_grad():
        y = model(x)
        alone = model(x[[0, 2]])
    assert torch.isnan(y[1]).any() and torch.isfinite(y[[0, 2]]).all()
    torch.testing.assert_close(y[[0, 2]], alone, rtol=1e-5, atol=1e-6)


def test_channel_attention_head_mask_held_by_the_module_equals_the_one_built_per_call():
    from moceir.models.attention import ChannelAttention, channel_attention, off_head_mask

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 12, 5, 7) for _ in range(3))
    temperature = torch.rand(3, 1, 1) + 0.5
    reference = channel_attention(q, k, v, 3, temperature)  # NCHW: per-head reshapes, no mask
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (q, k, v)]
    built = channel_attention(*cl, 3, temperature)
    held = channel_attention(*cl, 3, temperature, off_head_mask(12, 3))
    torch.testing.assert_close(built, reference)
    assert torch.equal(held, built)
    mask = off_head_mask(12, 3)
    assert mask.dtype == torch.bool and not mask[:4, :4].any() and mask[:4, 4:].all() and mask.sum() == 144 - 48
    # a non-persistent buffer: upstream checkpoints load strictly, and casts to half precision leave it boolean
    attention = ChannelAttention(12, 3, True).half()
    assert "off_head" not in attention.state_dict() and attention.off_head.dtype == torch.bool


def test_the_router_adds_its_complexity_bias_to_the_balance_loss():
    """Mutation audit: inverting use_complexity_bias in Router.forward passed every test (the goldens call
    importance_loss directly)."""
    from moceir.models.router import Router, importance_loss

    torch.manual_seed(0)
    biased = Router(8, 16, 4, 1, torch.tensor([1.0, 2.0, 4.0, 8.0]), True).train()
    plain = copy.deepcopy(biased)
    plain.use_complexity_bias = False
    x, e = torch.randn(6, 8, 4, 4), torch.randn(6, 16)
    torch.manual_seed(1)
    a = biased(x, e, True)
    torch.manual_seed(1)
    b = plain(x, e, True)
    p = a.logits.softmax(-1)
    expected = 0.5 * (importance_loss(p, biased.complexity) - importance_loss(p, None))
    assert expected.abs() > 1e-3
    torch.testing.assert_close(a.balance_loss - b.balance_loss, expected)


def test_training_adds_router_noise_and_eval_does_not():
    """Mutation audit: a network that never added router noise in training passed every test."""
    model = moceir.create_model("MoCE_IR_tiny").train()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    losses = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        losses.append(model(x).balance_loss)
    assert losses[0] != losses[1]
    with torch.no_grad():
        model.eval()
        torch.manual_seed(1)
        a = model(x, return_aux=True).balance_loss
        torch.manual_seed(2)
        assert torch.equal(a, model(x, return_aux=True).balance_loss)


def test_the_image_loss_reaches_the_routers_through_their_gates():
    """Mutation audit: gates detached from the graph passed every test. The gradient is small (a gate's scale
    cancels in the decoder's normalised queries), but only the gates carry it to the routers."""
    model = moceir.create_model("MoCE_IR_tiny", topk=2).train()
    model(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))).image.square().mean().backward()
    for adapter in model.adapters:
        grad = adapter.routing.freq_gate.weight.grad
        assert grad is not None and grad.abs().max() > 0


def test_forced_experts_reach_every_layer_of_decoder_levels_with_several_blocks():
    """Mutations: forcing sliced by decoder level instead of MoE layer (network.forward), or every block of a
    level forced with the level's first entry (DecoderGroup.forward). Both pass with the tiny preset (one block per
    level)."""
    model = moceir.create_model("MoCE_IR_tiny", num_dec_blocks=(2, 1, 3)).eval()
    fill_deterministic(model, 0.1)
    layers = model.num_moe_layers
    assert layers == 6
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    forced = ((torch.arange(layers)[:, None] + torch.arange(2)[None]) % 4)[..., None]  # [layers, B, 1], all differ
    with torch.no_grad():
        out = model(x, return_aux=True, experts=forced)
    assert torch.equal(out.expert_indices, forced)


def test_training_balance_loss_is_the_mean_over_the_moe_layers():
    """Mutation: .sum() instead of .mean() (the loss weight silently grows with the number of MoE layers)."""
    model = moceir.create_model("MoCE_IR_tiny").train()
    torch.manual_seed(0)
    out = model(torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    per_layer = torch.stack([r.balance_loss for r in out.routing])
    assert len(per_layer) == 3 and (per_layer > 0).all()
    torch.testing.assert_close(out.balance_loss, per_layer.mean())


def test_input_width_not_a_multiple_is_the_one_line_error_too():
    """Mutation: only the height checked; a width of 20 then failed deep inside PixelUnshuffle."""
    model = moceir.create_model("MoCE_IR_tiny").eval()
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.rand(1, 3, 16, 20))


def test_top1_expert_of_a_top2_network_is_its_highest_scoring_expert():
    """Mutation: MoCEOutput.experts took the last of the k picks instead of the first (no test uses topk=2 here)."""
    model = moceir.create_model("MoCE_IR_tiny", topk=2).eval()
    fill_deterministic(model, 0.3)
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(x, return_aux=True)
    assert out.expert_indices.shape == (3, 4, 2)
    best = torch.stack([r.logits.argmax(-1) for r in out.routing])  # eval: no noise, so the top score is the top logit
    assert torch.equal(out.experts, best)
    assert not torch.equal(out.expert_indices[..., 1], best)


def test_ffn_hidden_width_truncates_like_upstream():
    """Mutation: round() instead of int() for the hidden width: 16 x 2.66 = 42.56 gave 43 channels, so a checkpoint
    of upstream (Restormer's int(dim * ffn_expansion_factor)) with a non-integer factor would not load."""
    from moceir.models.layers import FeedForward

    ffn = FeedForward(16, 2.66, bias=False)
    assert ffn.project_out.in_channels == 42
    assert ffn.project_in.out_channels == ffn.dwconv.out_channels == 84
    model = moceir.create_model("MoCE_IR_tiny", ffn_expansion_factor=2.66)
    assert model.state_dict()["refinement.layers.0.ffn.project_out.weight"].shape == (8, 21, 1, 1)  # int(8*2.66)


def test_frequency_high_pass_starts_as_the_laplacian_in_every_channel_and_trains():
    """Mutation: a wrong centre tap. fill_deterministic overwrites every weight, so no golden sees the initialiser,
    yet every model trained from scratch starts from it (UPSTREAM_SPEC: [[-1,-1,-1],[-1,8,-1],[-1,-1,-1]])."""
    model = moceir.create_model("MoCE_IR_tiny")
    conv = model.freq_embed.high_conv[0].conv
    laplacian = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, 8.0, -1.0], [-1.0, -1.0, -1.0]])
    assert conv.weight.shape == (64, 1, 3, 3)
    assert torch.equal(conv.weight.detach(), laplacian.expand(64, 1, 3, 3))
    assert conv.weight.requires_grad  # upstream means to freeze it, but does not
    with torch.no_grad():  # a constant image has no high frequencies away from the zero-padded border
        assert conv(torch.ones(1, 64, 6, 6))[..., 1:-1, 1:-1].abs().max() == 0


def test_fused_disabled_restores_a_switched_off_state():
    """Mutation: disabled() turned the fused path back on at exit even when it had been switched off before."""
    from moceir.models import fused

    fused.set_enabled(False)
    try:
        with fused.disabled():
            pass
        assert not fused._enabled
    finally:
        fused.set_enabled(True)
    with fused.disabled():
        assert not fused._enabled
    assert fused._enabled


@pytest.mark.parametrize("value, enabled", [("", True), ("0", True), ("1", False)])
def test_moceir_no_cpu_fusion_zero_keeps_fusion_on(value, enabled):
    """Mutation: only an empty MOCEIR_NO_CPU_FUSION kept fusion on; the documented =0 turned it off."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MOCEIR_NO_CPU_FUSION": value}
    out = subprocess.run([sys.executable, "-c", "from moceir.models import fused; print(fused._enabled)"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(enabled)


def test_topk_may_equal_the_number_of_experts():
    """Mutation: ``topk < num_exp_blocks`` refused topk=4 of 4 experts (every expert in every layer)."""
    cfg = get_config("MoCE_IR_tiny", topk=4)
    assert cfg.topk == 4
    with pytest.raises(ValueError, match="topk must be in 1..num_exp_blocks=4"):
        get_config("MoCE_IR_tiny", topk=5)


@pytest.mark.parametrize("rank_type, latent_dim, ranks", [
    ("spread", 2, [8, 16, 32, 64]),  # C/8 .. C at width 64, latent_dim unused
    ("constant", 3, [3, 3, 3, 3]),
    ("lin", 3, [3, 4, 5, 6]),
    ("double", 3, [3, 5, 7, 9]),
    ("exp", 2, [2, 4, 8, 16]),
    ("fact", 2, [2, 6, 24, 120]),
])
def test_expert_ranks_of_every_rank_type(rank_type, latent_dim, ranks):
    """Mutations: "double" as r * 2**i, "exp" as r**i: no test built a network of those rank types. The rules are
    upstream's (moce_ir.py: constant r, lin r+i, double r+2i, exp r**(i+1), fact (r+i)!, spread C/2**(3-i))."""
    cfg = get_config("MoCE_IR_tiny", rank_type=rank_type, latent_dim=latent_dim)
    assert cfg.expert_ranks(64) == ranks


def test_a_newer_files_unknown_config_fields_are_ignored():
    """Mutation: from_dict passed every key to the constructor, so a config with a field this version lacks
    (a file written by a newer moceir) was refused."""
    cfg = get_config("MoCE_IR_tiny")
    assert MoCEConfig.from_dict({**cfg.to_dict(), "a_future_field": 1}) == cfg


@pytest.mark.parametrize("factor", [0, 0.0, -1.0])
def test_ffn_expansion_factor_must_be_positive(factor):
    """Mutation: ``0 <= factor`` let a factor of 0 through, to a torch error about zero-channel convolutions."""
    with pytest.raises(ValueError, match="ffn_expansion_factor must be a positive finite number"):
        MoCEConfig(ffn_expansion_factor=factor)


@pytest.mark.parametrize("field", ["bias", "with_complexity", "eval_router_noise"])
def test_bool_fields_refuse_strings(field):
    """Mutation: eval_router_noise dropped from BOOL_FIELDS; "false" from a JSON config then turned the upstream
    router-noise quirk on (a non-empty string is truthy)."""
    with pytest.raises(ValueError, match=f"{field} must be true or false"):
        MoCEConfig(**{field: "false"})
    network = moceir.create_model("MoCE_IR_tiny", **{field: True})
    assert getattr(network.config, field) is True
