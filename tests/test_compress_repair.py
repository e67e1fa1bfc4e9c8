"""Issue 28, part 1: `compress --repair` on BatchNorm-free MLPs is REPAIR (Jordan et al. 2022): each merged unit's
pre-activation mean and std on --data become the average of its original members'.

Oracles: a forward pass written here with torch (not otfuse's runnable), on an MLP whose hidden units come in
groups of near-copies (so the clusters are known by construction: group g is units g, g+G, g+2G, ...), with the
members' statistics computed from that forward; and a network of exact copies, whose compression is exact and
which REPAIR must leave as it is."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from conftest import cli

D, G, COPIES, OUT = 12, 8, 3, 4


def grouped_mlp(noise: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """12 -> 24 -> 4 MLP: hidden unit g + G*c is a copy of unit g (c = 0..2) with relative noise on its incoming
    weights; outgoing weights are the group's split three ways."""
    g = torch.Generator().manual_seed(seed)
    base_w, base_b = torch.randn(G, D, generator=g), torch.rand(G, generator=g) + 0.2
    w = torch.cat([base_w * (1 + noise * torch.randn(G, D, generator=g)) for _ in range(COPIES)])
    b = torch.cat([base_b * (1 + noise * torch.randn(G, generator=g)) for _ in range(COPIES)])
    out = torch.randn(OUT, G, generator=g).repeat(1, COPIES) / COPIES
    return {"0.weight": w, "0.bias": b, "2.weight": out, "2.bias": torch.zeros(OUT)}


def pre_activation(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return x.double() @ sd["0.weight"].double().T + sd["0.bias"].double()


def forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.relu(pre_activation(sd, x)) @ sd["2.weight"].double().T + sd["2.bias"].double()


def compress(tmp_path, sd, *repair) -> dict[str, torch.Tensor]:
    src, data = tmp_path / "m.safetensors", tmp_path / "x.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(src))
    x = torch.randn(400, D, generator=torch.Generator().manual_seed(1))
    save_file({"x": x}, str(data))
    out = tmp_path / ("r.safetensors" if repair else "p.safetensors")
    r = cli("compress", src, "-o", out, "--width", f"hidden={G}", *(["--repair", "--data", data, "--samples", "400"]
                                                                   if repair else []))
    assert r.exit_code == 0, r.output
    return load_file(out), x


def test_exact_copies_compress_exactly_and_repair_keeps_them(tmp_path):
    sd = grouped_mlp(noise=0.0)
    for repair in ((), ("repair",)):
        small, x = compress(tmp_path, sd, *repair)
        assert small["0.weight"].shape == (G, D)
        torch.testing.assert_close(forward(small, x), forward(sd, x), rtol=1e-5, atol=1e-5)


def test_repair_gives_each_merged_unit_its_members_mean_and_std(tmp_path):
    sd = grouped_mlp(noise=0.2)
    plain, x = compress(tmp_path, sd)
    fixed, _ = compress(tmp_path, sd, "repair")
    members = pre_activation(sd, x).reshape(len(x), COPIES, G)  # [:, c, g] = unit g + G*c
    target_mean, target_std = members.mean(0).mean(0), members.std(0, unbiased=False).mean(0)
    z_plain, z_fixed = pre_activation(plain, x), pre_activation(fixed, x)
    # the plain merge's units: the mean of their members, whose spread is below the members' average spread
    assert bool((z_plain.std(0, unbiased=False) < target_std).all())
    torch.testing.assert_close(z_fixed.mean(0), target_mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(z_fixed.std(0, unbiased=False), target_std, rtol=1e-4, atol=1e-4)
