"""Analytic FLOPs per image: 2 x multiply-accumulates of the matmuls and convolutions.

Counted like fvcore counts DiT (the 118.64 GMACs of DiT-XL/2): linear layers, the patch
convolution and the two attention matmuls (QK^T and PV); norms, activations, softmax and
elementwise ops are left out. Per-sample work (adaLN modulation, timestep MLP) is counted
once per image.

MDT (`mdt_pass_macs`) counts its skip linears and side-interpolater, and in training both
forwards, the masked one averaged over the per-step mask ratio.

Training (`train=True`) counts one step's work per image: the trained parts (masked
student encoder on L_keep tokens, decoder on L, head on L_keep) cost forward + 2 x forward
for the backward; the teacher (SD-DiT) is forward only, its encoder on all L tokens of its
view and its head on all L tokens (center_tokens='all') or the L_keep the loss uses.
"""

from __future__ import annotations

from torch import nn

from model.config import ModelConfig


def block_macs(tokens: int, dim: int, mlp_ratio: float, cond_dim: int) -> int:
    """One adaLN-Zero DiT block on `tokens` tokens of width dim."""
    hidden = int(dim * mlp_ratio)
    linear = tokens * (3 * dim * dim + dim * dim + 2 * dim * hidden)  # qkv, proj, fc1, fc2
    attention = 2 * tokens * tokens * dim  # QK^T and PV over all heads
    modulation = cond_dim * 6 * dim  # per sample
    return linear + attention + modulation


def embedder_macs(cfg: ModelConfig, freq_dim: int = 256) -> int:
    """Patch embedding of all L tokens and the timestep MLP (the label lookup is free)."""
    D, p = cfg.hidden_size, cfg.patch_size
    return cfg.num_tokens * cfg.in_channels * p * p * D + freq_dim * D + D * D


def encoder_macs(cfg: ModelConfig, tokens: int) -> int:
    return cfg.encoder_depth * block_macs(tokens, cfg.hidden_size, cfg.mlp_ratio, cfg.hidden_size)


def decoder_macs(cfg: ModelConfig, kept: int) -> int:
    """Decoder on the full L-token sequence, then the final adaLN layer and projection. A
    separate decoder's input layer (adaLN modulation per sample, Linear D -> Dd per token)
    runs before the scatter (on the `kept` encoder outputs) with a mask-token fill, after
    it (on all L) with the noisy-token fill."""
    D, Dd, L, p = cfg.hidden_size, cfg.dec_width, cfg.num_tokens, cfg.patch_size
    projected = kept if cfg.decoder_fill == "mask_token" else L
    projection = projected * D * Dd + D * 2 * D if cfg.separate_decoder else 0
    blocks = cfg.decoder_depth * block_macs(L, Dd, cfg.mlp_ratio, D)
    final = D * 2 * Dd + L * Dd * p * p * cfg.in_channels
    return projection + blocks + final


def head_macs(cfg: ModelConfig, tokens: int) -> int:
    if not cfg.has_teacher:
        return 0
    D, h, b = cfg.hidden_size, cfg.head_hidden_dim, cfg.head_bottleneck_dim
    return tokens * (D * h + h * h + h * b + b * cfg.n_prototypes)


def mdt_pass_macs(cfg: ModelConfig, kept: int | None) -> int:
    """One MDT forward: embedding of all L tokens, the encoder halves on `kept` tokens (all
    when None) with a skip linear (2D -> D per token) in each out-block, the side-interpolater
    block on all L (masked pass only), the decoder blocks on L each with an input-skip
    linear, and the final layer. The relative position bias is an add: not counted."""
    D, L, p, r = cfg.hidden_size, cfg.num_tokens, cfg.patch_size, cfg.mlp_ratio
    T = L if kept is None else kept
    half = cfg.encoder_depth // 2
    encoder = 2 * half * block_macs(T, D, r, D) + half * T * 2 * D * D
    side = 0 if kept is None else block_macs(L, D, r, D)
    decoder = cfg.decoder_depth * (block_macs(L, D, r, D) + L * 2 * D * D)
    final = D * 2 * D + L * D * p * p * cfg.in_channels
    return embedder_macs(cfg) + encoder + side + decoder + final


def forward_macs(cfg: ModelConfig) -> int:
    """Inference: every token through encoder and decoder; no teacher, no heads."""
    L = cfg.num_tokens
    if cfg.backbone == "mdt":
        return mdt_pass_macs(cfg, None)
    return embedder_macs(cfg) + encoder_macs(cfg, L) + decoder_macs(cfg, L)


def training_macs(cfg: ModelConfig) -> float:
    if cfg.backbone == "mdt":
        # Two trained forwards per step: unmasked, and masked at the expected kept count
        # (averaged over the per-step ratio, so attention's T^2 is averaged exactly).
        masked = sum(share * mdt_pass_macs(cfg, k) for k, share in cfg.kept_distribution)
        return 3 * (mdt_pass_macs(cfg, None) + masked)
    kept = cfg.encoder_tokens
    student = (embedder_macs(cfg) + encoder_macs(cfg, kept) + decoder_macs(cfg, kept)
               + head_macs(cfg, kept))
    teacher = 0
    if cfg.has_teacher:
        # Its head runs on every token when the centre averages all of them.
        head_tokens = cfg.num_tokens if cfg.center_tokens == "all" else kept
        teacher = (embedder_macs(cfg) + encoder_macs(cfg, cfg.num_tokens)
                   + head_macs(cfg, head_tokens))
    return 3 * student + teacher


def flops_per_image(net: nn.Module | ModelConfig, train: bool) -> float:
    """FLOPs (2 x MACs) for one image: a forward pass, or a full training step's work."""
    cfg = net if isinstance(net, ModelConfig) else net.config
    return 2.0 * float(training_macs(cfg) if train else forward_macs(cfg))


def parameter_count(cfg: ModelConfig) -> dict[str, int]:
    """Parameters of a network built from cfg (on the meta device, so nothing is allocated):
    'trainable' (student: everything an optimiser updates) and 'teacher' (SD-DiT's EMA copy)."""
    import torch

    from model.network import DiffusionTransformer

    with torch.device("meta"):
        net = DiffusionTransformer(cfg)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in net.parameters() if not p.requires_grad)
    return {"trainable": trainable, "teacher": frozen}


def method_table(methods: tuple[str, ...] | None = None,
                 sizes: tuple[str, ...] = ("S/2", "B/2", "XL/2")) -> list[dict]:
    """One row per method x size of the ImageNet-256 presets: trainable parameters, encoder
    tokens in training (per forward: MDT runs an unmasked and a masked one), and GFLOPs per
    image (training step and inference forward)."""
    from model.methods import METHODS
    from model.presets import make_config

    rows = []
    for method in methods or METHODS:
        for size in sizes:
            cfg = make_config(f"{method}-{size}")
            params = parameter_count(cfg)
            rows.append({
                "model": f"{method}-{size}", "method": method, "size": size,
                "params_m": params["trainable"] / 1e6, "teacher_params_m": params["teacher"] / 1e6,
                "encoder_tokens": cfg.encoder_tokens, "encoder_passes": cfg.encoder_passes,
                "train_gflops": flops_per_image(cfg, train=True) / 1e9,
                "forward_gflops": flops_per_image(cfg, train=False) / 1e9,
            })
    return rows


def format_method_table(rows: list[dict]) -> str:
    """The rows of `method_table` as a Markdown table."""
    dit = {r["size"]: r["train_gflops"] for r in rows if r["method"] == "DiT"}
    lines = ["| model | params (M) | teacher (M) | encoder tokens | train GFLOPs/img | "
             "vs DiT | forward GFLOPs |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ratio = f"{r['train_gflops'] / dit[r['size']]:.2f}x" if r["size"] in dit else "-"
        tokens = " + ".join(str(t) for t in r["encoder_passes"])
        lines.append(f"| {r['model']} | {r['params_m']:.1f} | {r['teacher_params_m']:.1f} | "
                     f"{tokens} | {r['train_gflops']:.1f} | {ratio} | "
                     f"{r['forward_gflops']:.1f} |")
    return "\n".join(lines)

