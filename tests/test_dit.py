"""DiT: the public checkpoints' parameter names and shapes, guidance convention, and exactness on a tiny DiT."""
import pytest
import torch

from models.adapters import DiTDenoiser
from models.dit import DiT_models
from paratAA import dit_schedule, sample_sequential, solve

# depth, hidden, heads of the reference registry
SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}


def reference_shapes(depth, hidden, patch, input_size=32, in_channels=4, num_classes=1000):
    """Parameter names and shapes of facebookresearch/DiT's models.py, written out from its architecture."""
    tokens = (input_size // patch) ** 2
    shapes = {"pos_embed": (1, tokens, hidden),
              "x_embedder.proj.weight": (hidden, in_channels, patch, patch), "x_embedder.proj.bias": (hidden,),
              "t_embedder.mlp.0.weight": (hidden, 256), "t_embedder.mlp.0.bias": (hidden,),
              "t_embedder.mlp.2.weight": (hidden, hidden), "t_embedder.mlp.2.bias": (hidden,),
              "y_embedder.embedding_table.weight": (num_classes + 1, hidden),
              "final_layer.linear.weight": (patch * patch * 2 * in_channels, hidden),
              "final_layer.linear.bias": (patch * patch * 2 * in_channels,),
              "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
              "final_layer.adaLN_modulation.1.bias": (2 * hidden,)}
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "attn.qkv.weight": (3 * hidden, hidden), b + "attn.qkv.bias": (3 * hidden,),
                       b + "attn.proj.weight": (hidden, hidden), b + "attn.proj.bias": (hidden,),
                       b + "mlp.fc1.weight": (4 * hidden, hidden), b + "mlp.fc1.bias": (4 * hidden,),
                       b + "mlp.fc2.weight": (hidden, 4 * hidden), b + "mlp.fc2.bias": (hidden,),
                       b + "adaLN_modulation.1.weight": (6 * hidden, hidden),
                       b + "adaLN_modulation.1.bias": (6 * hidden,)})
    return shapes


@pytest.mark.parametrize("name", [f"DiT-{s}/{p}" for s in SIZES for p in (2, 4, 8)])
@pytest.mark.parametrize("input_size", [32, 64])  # 256x256 and 512x512 images
def test_state_dict_has_the_reference_names_and_shapes(name, input_size):
    size, patch = name[4:].split("/")
    depth, hidden, _ = SIZES[size]
    with torch.device("meta"):
        model = DiT_models[name](input_size=input_size, num_classes=1000)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == reference_shapes(depth, hidden, int(patch), input_size)


def test_dit_xl2_has_675m_parameters():
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=32, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == 675_129_632


def tiny_dit(seed=0, dtype=torch.float64):
    from models.dit import DiT
    torch.manual_seed(seed)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    # adaLN-Zero starts as the identity and a zero output; randomise so the network is a nonlinear map
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    return model.to(dtype).eval()


def test_guidance_mixes_only_the_first_three_channels():
    model = tiny_dit(dtype=torch.float32)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 20])
    y, null = torch.tensor([3, 7]), torch.tensor([10, 10])
    cond, uncond = model(x, t, y), model(x, t, null)
    out = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), 4.0)[:2]
    assert torch.allclose(out[:, :3], uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]), atol=1e-5)
    assert torch.allclose(out[:, 3:], cond[:, 3:], atol=1e-6)
    eps = DiTDenoiser(model, 4.0)(x, t, y)
    assert eps.shape == x.shape and torch.allclose(eps, out[:, :4])


def test_fp16_forward():
    model = tiny_dit(dtype=torch.float16)
    out = DiTDenoiser(model, 4.0)(torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 1, 2]))
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("order, memory, window", [(1, 1, 10), (3, 2, 4), (10, 3, 10), (10, 4, 7)])
def test_tiny_dit_tolerance_zero_equals_sequential(order, memory, window, eta):
    T = 10
    eps = DiTDenoiser(tiny_dit(), cfg_scale=3.0)
    schedule = dit_schedule(T, eta)
    noise = torch.randn(2, T + 1, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.tensor([1, 5])
    ref = sample_sequential(eps, schedule, noise, labels, model_dtype=torch.float64)
    out = solve(eps, schedule, noise, labels, window_size=window, order=order, memory_size=memory, tol1=0, tol2=0,
                model_dtype=torch.float64)
    assert out.max_iterations <= T
    assert torch.allclose(out.trajectory, ref, atol=1e-10, rtol=0), float((out.trajectory - ref).abs().max())


def test_tiny_dit_batch_equals_separate_solves():
    T = 20
    eps = DiTDenoiser(tiny_dit(), cfg_scale=3.0)
    schedule = dit_schedule(T)
    noise = torch.randn(3, T + 1, 4, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    labels = torch.tensor([0, 4, 9])
    together = solve(eps, schedule, noise, labels, memory_size=3, model_dtype=torch.float64)
    for b in range(3):
        alone = solve(eps, schedule, noise[b:b + 1], labels[b:b + 1], memory_size=3, model_dtype=torch.float64)
        assert alone.iterations[0] == together.iterations[b]
        assert torch.allclose(alone.samples[0], together.samples[b], atol=1e-9, rtol=0)
