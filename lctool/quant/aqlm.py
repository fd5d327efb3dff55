"""AQLM (Egiazarian et al., 2024): additive vector quantization of one weight matrix.

Each row's inputs are cut into groups of `in_group_size` consecutive columns; a group is the sum of
one codeword from each of M codebooks of 2^B vectors, times the row's scale:

    W[o, j*g:(j+1)*g] = scales[o] * Σ_m codebooks[m, codes[o, j, m], 0, :]

Codes are chosen by beam search on the layer's output error ‖(W−Ŵ)X‖² = Σ_o (w_o−ŵ_o)ᵀ H (w_o−ŵ_o)
(H = XXᵀ, from engine.HessianCollector); codebooks and scales are then refitted to that same error
by Adam (codes fixed), and the two steps alternate. Pure math on tensors: no model, no file.

On disk (the stock `aqlm` layout transformers + the aqlm package read): `codes` [O, I/g, M] int8
(B ≤ 8) or int16 (B ≤ 16) holding code mod 2^B, i.e. stored signed; `codebooks` [M, 2^B, 1, g]
fp16; `scales` [O, 1, 1, 1] fp16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCORE_BUDGET = 1 << 22  # floats in one [rows, beam, codewords] score block


@dataclass(frozen=True)
class AqlmSettings:
    num_codebooks: int = 1
    nbits: int = 8
    in_group_size: int = 8
    out_group_size: int = 1
    beam_size: int = 4
    rounds: int = 3  # beam search + codebook refit alternations
    kmeans_iters: int = 10
    adam_steps: int = 100
    adam_lr: float = 1e-3

    @property
    def codebook_size(self) -> int:
        return 1 << self.nbits


@dataclass
class AqlmResult:
    codes: torch.Tensor  # int64 [O, I/g, M], values in [0, 2^B)
    codebooks: torch.Tensor  # float32 [M, 2^B, 1, g] (fp16-representable)
    scales: torch.Tensor  # float32 [O, 1, 1, 1] (fp16-representable)
    w_hat: torch.Tensor  # float32 [O, I]: exactly dequantize(codes, codebooks, scales)
    errors: list[float]  # relative output error after each round


def dequantize(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float weight [O, I] of (codes [O, I/g, M] any int dtype, codebooks [M, K, 1, g], scales [O,1,1,1])."""
    num_codebooks, size, out_group, in_group = codebooks.shape
    rows, groups, _ = codes.shape
    index = codes.long() % size  # stored codes are signed (code mod 2^B)
    gathered = codebooks[:, :, 0, :][torch.arange(num_codebooks), index]  # [O, I/g, M, g]
    vectors = gathered.sum(dim=2)  # [O, I/g, g]
    return (vectors * scales.reshape(rows, 1, 1)).reshape(rows, groups * in_group)


def stored_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """Codes as the aqlm package stores them: int8 up to 8 bits, int16 up to 16, wrapping to negative."""
    dtype = torch.int8 if nbits <= 8 else torch.int16
    width = 8 if nbits <= 8 else 16
    wrapped = torch.where(codes >= 1 << (width - 1), codes - (1 << width), codes)
    return wrapped.to(dtype).contiguous()


def output_error(weight: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """‖(W−Ŵ)X‖² / ‖WX‖² through H."""
    delta = weight - w_hat
    num = torch.einsum("oi,ij,oj->", delta, hessian, delta)
    den = torch.einsum("oi,ij,oj->", weight, hessian, weight).clamp_min(1e-30)
    return float(num / den)


def _normalized_hessian(hessian: torch.Tensor, in_features: int) -> torch.Tensor:
    """H scaled to unit mean diagonal, lightly damped; dead inputs get a unit diagonal."""
    h = hessian.double().clone()
    diagonal = torch.arange(in_features)
    dead = torch.diag(h) <= 0
    h[dead, dead] = 1
    h /= torch.diag(h).mean()
    h[diagonal, diagonal] += 1e-4
    return h.float()


def _kmeans(vectors: torch.Tensor, weights: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Weighted k-means centroids [k, g] of `vectors` [N, g] (weights [N, g] per coordinate)."""
    n = vectors.shape[0]
    picks = torch.randperm(n, generator=generator)[:k] if k <= n else torch.randint(n, (k,), generator=generator)
    centroids = vectors[picks].clone()
    if k > n:  # more codewords than vectors: jitter the repeats so they can specialize
        centroids += 1e-3 * vectors.std() * torch.randn(centroids.shape, generator=generator)
    for _ in range(iters):
        assign = _nearest(vectors, centroids)
        mass = torch.zeros_like(centroids).index_add_(0, assign, weights)
        total = torch.zeros_like(centroids).index_add_(0, assign, weights * vectors)
        filled = mass > 0
        centroids = torch.where(filled, total / mass.clamp_min(1e-30), centroids)
    return centroids


def _nearest(vectors: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    chunk = max(1, SCORE_BUDGET // centroids.shape[0])
    out = []
    for start in range(0, vectors.shape[0], chunk):
        out.append(torch.cdist(vectors[start : start + chunk], centroids).argmin(dim=1))
    return torch.cat(out)


def initialize(weight: torch.Tensor, h: torch.Tensor, s: AqlmSettings, generator: torch.Generator):
    """Per-row scales, then residual k-means: codebook m clusters what codebooks < m left over."""
    rows, in_features = weight.shape
    g = s.in_group_size
    scales = weight.square().mean(dim=1).sqrt().clamp_min(1e-8)  # [O]
    target = (weight / scales[:, None]).reshape(-1, g)
    importance = torch.diag(h).reshape(1, -1, g).expand(rows, -1, -1).reshape(-1, g)
    residual = target.clone()
    codebooks, codes = [], []
    for _ in range(s.num_codebooks):
        centroids = _kmeans(residual, importance, s.codebook_size, s.kmeans_iters, generator)
        assign = _nearest(residual, centroids)
        residual = residual - centroids[assign]
        codebooks.append(centroids)
        codes.append(assign)
    codes = torch.stack(codes, dim=1).reshape(rows, in_features // g, s.num_codebooks)
    return codes, torch.stack(codebooks)[:, :, None, :], scales.reshape(rows, 1, 1, 1)


def beam_search(target: torch.Tensor, h: torch.Tensor | None, codes: torch.Tensor, codebooks: torch.Tensor,
                beam_size: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """New codes [O, I/g, M] minimising Σ_o (t_o − v_o)ᵀ H (t_o − v_o), v_o the decoded (unscaled) row.

    Every row keeps `beam_size` hypotheses. One (group, codebook) slot at a time, each hypothesis
    tries all 2^B codewords in that slot: with e = t − v the change of the error is
    −2 Δᵀ(He)_j + Δᵀ H_jj Δ for Δ = c_new − c_old, so only H e is carried. The current codes are
    the starting hypothesis and are always among the candidates, so the error never increases.

    `h` None means H = I (plain squared error): the groups are then independent, and each is
    searched on its own. `mask` [O, I/g] bool limits the search to the groups marked True; the
    codes of the other groups come back unchanged (PV-Tuning's subspace V step).
    """
    if h is None:
        return _groupwise_search(target, codes, codebooks, beam_size, mask)
    chunk = max(1, SCORE_BUDGET // (beam_size * codebooks.shape[1]))
    parts = []
    for i in range(0, target.shape[0], chunk):
        rows = slice(i, i + chunk)
        if mask is not None and not mask[rows].any():
            parts.append(codes[rows].clone())
            continue
        parts.append(_beam_rows(target[rows], h, codes[rows], codebooks, beam_size,
                                None if mask is None else mask[rows]))
    return torch.cat(parts)


def _groupwise_search(target, codes, codebooks, beam_size, mask):
    """beam_search with H = I: every (selected) group is a one-group row of its own."""
    rows, groups, num_codebooks = codes.shape
    g = codebooks.shape[-1]
    selected = torch.ones(rows, groups, dtype=torch.bool) if mask is None else mask
    flat_target = target.reshape(rows, groups, g)[selected]  # [N, g]
    flat_codes = codes[selected][:, None, :]  # [N, 1, M]
    identity = torch.eye(g, dtype=target.dtype)
    chunk = max(1, SCORE_BUDGET // (beam_size * codebooks.shape[1]))
    found = [_beam_rows(flat_target[i : i + chunk], identity, flat_codes[i : i + chunk], codebooks, beam_size)
             for i in range(0, flat_target.shape[0], chunk)]
    out = codes.clone()
    if found:
        out[selected] = torch.cat(found)[:, 0, :].to(out.dtype)
    return out


def _beam_rows(target, h, codes, codebooks, beam_size, mask=None):
    rows, groups, num_codebooks = codes.shape
    g = codebooks.shape[-1]
    words = codebooks[:, :, 0, :]  # [M, K, g]
    size = words.shape[1]
    codes = codes.clone()[:, None].expand(rows, 1, groups, num_codebooks).clone()  # [O, b, G, M]
    error = (target - dequantize(codes[:, 0], codebooks, torch.ones(rows, 1, 1, 1)))[:, None]  # [O, b, I]
    h_error = error @ h  # [O, b, I]
    loss = (error * h_error).sum(-1)  # [O, b]
    for j in range(groups):
        frozen = None if mask is None else ~mask[:, j]  # [O]: rows whose group j must keep its codes
        if frozen is not None and frozen.all():
            continue
        cols = slice(j * g, (j + 1) * g)
        h_jj = h[cols, cols]
        for m in range(num_codebooks):
            c = words[m]  # [K, g]
            old = c[codes[:, :, j, m]]  # [O, b, g]
            c_h = c @ h_jj  # [K, g]
            quad_new = (c_h * c).sum(-1)  # [K]
            linear = h_error[:, :, cols] @ c.T  # [O, b, K]: (He)_jᵀ c_new
            old_h = old @ h_jj  # [O, b, g]
            cross = old @ c_h.T  # [O, b, K]: c_oldᵀ H_jj c_new
            old_linear = (h_error[:, :, cols] * old).sum(-1, keepdim=True)
            old_quad = (old_h * old).sum(-1, keepdim=True)
            # Δᵀ H Δ − 2Δᵀ He with Δ = c_new − c_old
            change = quad_new - 2 * cross + old_quad - 2 * (linear - old_linear)
            if frozen is not None and frozen.any():
                # A frozen row's only candidate per hypothesis is its own current word, at no change.
                keep = torch.full_like(change, float("inf")).scatter_(2, codes[:, :, j, m, None], 0.0)
                change = torch.where(frozen[:, None, None], keep, change)
            candidates = (loss[:, :, None] + change).reshape(rows, -1)  # [O, b*K]
            width = min(beam_size, candidates.shape[1])
            best, pick = candidates.topk(width, dim=1, largest=False)
            parent, word = pick // size, pick % size
            codes = torch.gather(codes, 1, parent[:, :, None, None].expand(-1, -1, groups, num_codebooks)).clone()
            error = torch.gather(error, 1, parent[:, :, None].expand(-1, -1, error.shape[-1]))
            h_error = torch.gather(h_error, 1, parent[:, :, None].expand(-1, -1, h_error.shape[-1]))
            old = torch.gather(old, 1, parent[:, :, None].expand(-1, -1, g))
            delta = c[word] - old  # [O, b, g]
            codes[:, :, j, m] = word
            error[:, :, cols] -= delta
            h_error -= delta @ h[cols, :]
            loss = best
    return codes[:, 0]


def refit(weight, h, codes, codebooks, scales, steps: int, lr: float):
    """Codebooks and scales by Adam on ‖(W−Ŵ)X‖² with the codes fixed; then the exact per-row scale."""
    codebooks = codebooks.clone().requires_grad_(True)
    scale_values = scales.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([codebooks, scale_values], lr=lr)
    norm = torch.einsum("oi,ij,oj->", weight, h, weight).clamp_min(1e-30)
    for _ in range(steps):
        optimizer.zero_grad()
        delta = weight - dequantize(codes, codebooks, scale_values)
        loss = ((delta @ h) * delta).sum() / norm
        loss.backward()
        optimizer.step()
    codebooks = codebooks.detach()
    # Least squares per row: s_o = (w_oᵀ H v_o) / (v_oᵀ H v_o), v_o the unscaled decoded row.
    unscaled = dequantize(codes, codebooks, torch.ones_like(scales))
    hv = unscaled @ h
    scales = ((weight * hv).sum(1) / (unscaled * hv).sum(1).clamp_min(1e-30)).reshape(-1, 1, 1, 1)
    return codebooks, scales


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).float()


def aqlm_quantize(weight: torch.Tensor, hessian: torch.Tensor, settings: AqlmSettings,
                  generator: torch.Generator | None = None) -> AqlmResult:
    s = settings
    weight = weight.float()
    _, in_features = weight.shape
    generator = generator or torch.Generator().manual_seed(0)
    h = _normalized_hessian(hessian, in_features)
    codes, codebooks, scales = initialize(weight, h, s, generator)
    errors = []
    for _ in range(s.rounds):
        codes = beam_search(weight / scales.reshape(-1, 1), h, codes, codebooks, s.beam_size)
        codebooks, scales = refit(weight, h, codes, codebooks, scales, s.adam_steps, s.adam_lr)
        codebooks, scales = _fp16(codebooks), _fp16(scales)
        errors.append(output_error(weight, dequantize(codes, codebooks, scales), h))
    # The final codes are searched against the stored (fp16) codebooks and scales.
    codes = beam_search(weight / scales.reshape(-1, 1), h, codes, codebooks, s.beam_size)
    w_hat = dequantize(codes, codebooks, scales)
    errors.append(output_error(weight, w_hat, h))
    return AqlmResult(codes=codes, codebooks=codebooks, scales=scales, w_hat=w_hat, errors=errors)


def aqlm_tensors(result: AqlmResult, nbits: int, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    tensors = {
        "codes": stored_codes(result.codes, nbits),
        "codebooks": result.codebooks.to(torch.float16).contiguous(),
        "scales": result.scales.to(torch.float16).contiguous(),
    }
    if bias is not None:
        tensors["bias"] = bias.to(torch.float16)
    return tensors


def true_bits(out_features: int, in_features: int, s: AqlmSettings, codebook_bits: int = 16, scale_bits: int = 16) -> int:
    """Information bits of one quantized Linear: codes at B bits each, plus codebooks and scales as stored."""
    codes = out_features * (in_features // s.in_group_size) * s.num_codebooks * s.nbits
    codebooks = s.num_codebooks * s.codebook_size * s.in_group_size * codebook_bits
    return codes + codebooks + out_features * scale_bits


def quantization_config(s: AqlmSettings, not_converted: list[str]) -> dict:
    return {
        "quant_method": "aqlm",
        "in_group_size": s.in_group_size,
        "out_group_size": s.out_group_size,
        "num_codebooks": s.num_codebooks,
        "nbits_per_codebook": s.nbits,
        "linear_weights_not_to_quantize": not_converted,
    }
