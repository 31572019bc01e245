"""The ``toy2d`` backbone: an exact Gaussian-mixture flow teacher in R^d with residual-MLP role adapters.

Teacher. Clean data ``x0 ~ Σ_k w_k N(μ_k, s_k² I)`` (isotropic, ``s_k`` a scalar per component). With the flow
convention ``x_σ = (1−σ) x0 + σ ε`` (methods.md §1.1) component ``k`` has the marginal

    p_σ(x | k) = N(x; (1−σ) μ_k, v_k(σ) I),      v_k(σ) = (1−σ)² s_k² + σ².

Everything the teacher predicts is a posterior average over components with responsibilities
``γ_k(x) ∝ w_k N(x; (1−σ) μ_k, v_k I)``:

    E[x0 | x, k] = μ_k + (1−σ) s_k² / v_k · (x − (1−σ) μ_k)
    E[ε  | x, k] = σ / v_k · (x − (1−σ) μ_k)
    x̂0 = Σ_k γ_k E[x0 | x, k],   ε̂ = Σ_k γ_k E[ε | x, k]
    v   = ε̂ − x̂0                                  (= (x − x̂0)/σ, without dividing by σ)
    ∇_x log p_σ(x) = −Σ_k γ_k (x − (1−σ) μ_k) / v_k  (= −ε̂/σ)

``v_k(σ) ≥ min(s_k², 1)/2 > 0`` on the whole of [0, 1], so these forms are finite at σ = 0 (x̂0 = x) and σ = 1
(x̂0 = Σ w_k μ_k, ε̂ = x). They are evaluated in float64 and returned in the input's dtype.

Prompts. Each prompt names a subset of components; its distribution is the mixture of those components with the
weights renormalised. The empty prompt ``""`` is the full mixture (so CFG against the null prompt is defined).
The conditioning of a batch is a ``(B, K)`` tensor of per-sample component weights (zeros for components the
prompt does not select), so the velocity is exact for every prompt.

Roles (architecture.md §3) live in a :class:`~fewstep_rl.roles.residual.ResidualStore`: role ``r`` predicts
``v_base + a_r(x, σ, c)`` where ``a_r`` is a residual MLP on ``[x, φ(σ), c]`` with a zero-initialised last layer,
so every role starts exactly equal to the teacher. The base is the analytic velocity plus the outputs of every
*merged* (frozen) adapter: ``merge_role`` appends a frozen copy of a role's adapter to ``store.merged`` and resets
the role, so the teacher/reference then equals the old role. Only ``roles.mode: lora`` (these adapters) applies.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from fewstep_rl.backbones.base import Backbone
from fewstep_rl.roles.residual import ResidualStore
from fewstep_rl.roles.shards import assign_

#: Frequencies of the sin/cos features of σ fed to the adapters: φ(σ) = [σ, sin(fπσ), cos(fπσ) for f in FREQS].
SIGMA_FREQS = (1.0, 2.0, 4.0)


def sigma_features(sigma: Tensor) -> Tensor:
    """``φ(σ) = [σ, sin(fπσ), cos(fπσ) for f in SIGMA_FREQS]``; shape (B,) → (B, 1 + 2·len(SIGMA_FREQS))."""
    s = sigma.reshape(-1, 1)
    feats = [s]
    for f in SIGMA_FREQS:
        feats += [torch.sin(f * math.pi * s), torch.cos(f * math.pi * s)]
    return torch.cat(feats, dim=1)


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from a stable hash (sha256) of ``parts``; independent of ``PYTHONHASHSEED``."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_gaussian_mixture(
    means: Tensor, stds: Tensor, weights: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Exact draws ``x_i ~ Σ_k W_ik N(μ_k, s_k² I)``, one per row of ``weights``.

    Args:
        means: (K, d) component means.
        stds: (K,) isotropic standard deviations.
        weights: (N, K) non-negative per-sample component weights (rows need not be normalised).
        generator: the only source of randomness; draws happen on its device.

    Returns:
        (N, d) samples, float64, on ``means``' device.
    """
    dev = generator.device if generator is not None else torch.device("cpu")
    w = weights.to(device=dev, dtype=torch.float64)
    k = torch.multinomial(w, 1, generator=generator).squeeze(1)
    eps = torch.randn(w.shape[0], means.shape[1], generator=generator, device=dev, dtype=torch.float64)
    mu = means.to(device=dev, dtype=torch.float64)
    sd = stds.to(device=dev, dtype=torch.float64)
    return (mu[k] + sd[k, None] * eps).to(means.device)


class ResidualMLP(nn.Module):
    """Role adapter ``a(x, σ, c) = MLP([x, φ(σ), c])`` with SiLU and a zero-initialised last layer.

    Args:
        dim: data dimension d (also the output dimension).
        n_components: K (width of the conditioning).
        hidden: hidden width.
        layers: number of linear layers (≥ 1); the last maps to d and starts at zero.
    """

    def __init__(self, dim: int, n_components: int, hidden: int = 128, layers: int = 3) -> None:
        super().__init__()
        if layers < 1 or hidden < 1:
            raise ValueError(f"adapter needs layers >= 1 and hidden >= 1, got layers={layers}, hidden={hidden}")
        widths = [dim + 1 + 2 * len(SIGMA_FREQS) + n_components] + [hidden] * (layers - 1) + [dim]
        mods: list[nn.Module] = []
        for i in range(layers):
            mods.append(nn.Linear(widths[i], widths[i + 1]))
            if i < layers - 1:
                mods.append(nn.SiLU())
        self.net = nn.Sequential(*mods)

    @property
    def last(self) -> nn.Linear:
        """The output layer (zero at initialisation)."""
        return self.net[-1]  # type: ignore[return-value]

    @torch.no_grad()
    def reset(self, generator: torch.Generator) -> None:
        """Hidden layers ~ U(±1/√fan_in) (PyTorch's default ``Linear`` law) from ``generator``; last layer = 0."""
        linears = [m for m in self.net if isinstance(m, nn.Linear)]
        for lin in linears[:-1]:
            bound = 1.0 / math.sqrt(lin.in_features)
            for p in (lin.weight, lin.bias):
                u = torch.rand(p.shape, generator=generator, dtype=torch.float64, device=generator.device)
                assign_(p, (2 * u - 1) * bound)  # the full init on every rank; an FSDP2 shard keeps its chunk
        linears[-1].weight.zero_()
        linears[-1].bias.zero_()

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor) -> Tensor:
        p = self.last.weight
        inp = torch.cat([x.flatten(1), sigma_features(sigma.reshape(-1)), cond], dim=1).to(p.dtype)
        return self.net(inp).to(x.dtype)


class GaussianMixtureBackbone(Backbone):
    """Exact Gaussian-mixture flow teacher with residual-MLP role adapters (see the module docstring).

    Args:
        means: (K, d) component means μ_k.
        stds: (K,) isotropic standard deviations s_k > 0.
        weights: (K,) positive mixture weights w_k (renormalised).
        prompt_components: prompt → component indices; ``""`` (the full mixture) is always added.
        hidden: adapter hidden width.
        layers: adapter depth (number of linear layers).

    Attributes:
        store: the roles: one :class:`ResidualMLP` per role in ``store.adapters``, merged ones in ``store.merged``,
            folded ones in ``store.folded``.
        prompt_components: prompt → component indices, including ``""``.
    """

    def __init__(
        self,
        means: Sequence[Sequence[float]] | Tensor,
        stds: Sequence[float] | Tensor,
        weights: Sequence[float] | Tensor,
        prompt_components: Mapping[str, Sequence[int]] | None = None,
        hidden: int = 128,
        layers: int = 3,
    ) -> None:
        super().__init__()
        mu = torch.as_tensor(means, dtype=torch.float64, device="cpu")
        sd = torch.as_tensor(stds, dtype=torch.float64, device="cpu")
        w = torch.as_tensor(weights, dtype=torch.float64, device="cpu")
        if mu.dim() != 2 or sd.shape != (mu.shape[0],) or w.shape != (mu.shape[0],):
            raise ValueError(
                f"need means (K, d), stds (K,), weights (K,); got {tuple(mu.shape)}, {tuple(sd.shape)}, {tuple(w.shape)}"
            )
        if not bool((sd > 0).all()) or not bool((w > 0).all()):
            raise ValueError("every std and every weight must be > 0")
        self.n_components, self.dim = mu.shape
        self.sample_shape = (self.dim,)
        self.hidden, self.layers = hidden, layers
        self.register_buffer("means", mu, persistent=False)
        self.register_buffer("stds", sd, persistent=False)
        self.register_buffer("weights", w / w.sum(), persistent=False)
        pc = {str(k): [int(i) for i in v] for k, v in (prompt_components or {}).items()}
        pc[""] = list(range(self.n_components))
        for name, idx in pc.items():
            if not idx or any(not 0 <= i < self.n_components for i in idx):
                raise ValueError(
                    f"prompt {name!r}: component indices {idx} must be non-empty and in [0, {self.n_components})"
                )
        self.prompt_components = pc
        table = torch.zeros(len(pc), self.n_components, dtype=torch.float64, device="cpu")
        for row, idx in enumerate(pc.values()):
            table[row, idx] = self.weights[idx]
        self._prompt_row = {name: row for row, name in enumerate(pc)}
        self.register_buffer("prompt_weights", table / table.sum(1, keepdim=True), persistent=False)
        self._exact_masters = {k: getattr(self, k).clone() for k in ("means", "stds", "weights", "prompt_weights")}
        self.store = ResidualStore(self._new_adapter, self._init_adapter)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """Device moves apply to the analytic buffers, dtype casts do not: they are restored in float64.

        (``module.to(torch.bfloat16)`` or a ``*-true`` precision plugin would otherwise round the teacher itself.)
        """
        out = super()._apply(fn, recurse)
        dev = self.means.device
        dt = torch.float32 if dev.type == "mps" else torch.float64
        for name, master in self._exact_masters.items():
            setattr(self, name, master.to(device=dev, dtype=dt))
        return out

    # ---------------------------------------------------------------- conditioning
    @property
    def prompts(self) -> list[str]:
        """Every valid prompt (including ``""``)."""
        return list(self.prompt_components)

    def prompt_mixture(self, prompt: str) -> tuple[Tensor, Tensor, Tensor]:
        """``(means (K,d), stds (K,), weights (K,))`` of ``prompt``'s distribution, float64 (zeros for unselected)."""
        return self.means, self.stds, self.encode_prompts([prompt], dtype=torch.float64)[0]

    def encode_prompts(self, prompts: Sequence[str], dtype: torch.dtype | None = None) -> Tensor:
        """Per-sample renormalised component weights, shape (B, K) (float32 unless ``dtype`` is given).

        Raises:
            KeyError: for a prompt this backbone does not know (the message lists the valid ones).
        """
        unknown = [p for p in prompts if p not in self._prompt_row]
        if unknown:
            raise KeyError(f"unknown toy2d prompt(s) {sorted(set(unknown))}; valid prompts: {self.prompts}")
        rows = torch.tensor([self._prompt_row[p] for p in prompts], dtype=torch.long, device=self.prompt_weights.device)
        return self.prompt_weights[rows].to(dtype or torch.get_default_dtype())

    def null_cond(self, n: int) -> Tensor:
        """The full mixture's weights repeated ``n`` times, (n, K)."""
        return self.encode_prompts([""] * n)

    # ---------------------------------------------------------------- analytic teacher
    def _calc_dtype(self) -> torch.dtype:
        return torch.float32 if self.means.device.type == "mps" else torch.float64

    @staticmethod
    def _sigma_column(sigma: Tensor | float, x: Tensor, dt: torch.dtype) -> Tensor:
        """σ as a (B, 1) column in ``dt`` (a Python float goes straight to ``dt``, without a float32 round trip)."""
        s = torch.as_tensor(sigma, dtype=dt if not torch.is_tensor(sigma) else None).to(device=x.device, dtype=dt)
        return s.expand(x.shape[0]).reshape(-1, 1) if s.dim() == 0 else s.reshape(-1, 1)

    def _posterior(self, x: Tensor, sigma: Tensor | float, cond: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Responsibilities γ (B,K), residuals x − (1−σ)μ_k (B,K,d), variances v_k (B,K) and σ (B,1), in float64."""
        dt = self._calc_dtype()
        sig = self._sigma_column(sigma, x, dt)
        xx = x.reshape(x.shape[0], self.dim).to(dt)
        mu, sd = self.means.to(dt), self.stds.to(dt)
        var = (1 - sig) ** 2 * sd**2 + sig**2  # (B, K)
        resid = xx[:, None, :] - (1 - sig)[:, :, None] * mu[None]  # (B, K, d)
        logn = -0.5 * (resid**2).sum(-1) / var - 0.5 * self.dim * torch.log(2 * math.pi * var)
        logw = torch.log(cond.to(device=xx.device, dtype=dt).clamp_min(0))  # -inf for unselected components
        gamma = torch.softmax(logw + logn, dim=1)
        return gamma, resid, var, sig

    def posterior_x0(self, x: Tensor, sigma: Tensor | float, cond: Tensor) -> Tensor:
        """Exact ``E[x0 | x_σ = x, c] = Σ_k γ_k (μ_k + (1−σ) s_k²/v_k (x − (1−σ)μ_k))`` in ``x``'s dtype."""
        gamma, resid, var, sig = self._posterior(x, sigma, cond)
        sd2 = self.stds.to(var.dtype) ** 2
        ex0 = self.means.to(var.dtype)[None] + ((1 - sig) * sd2 / var)[..., None] * resid
        return (gamma[..., None] * ex0).sum(1).to(x.dtype).reshape(x.shape)

    def posterior_eps(self, x: Tensor, sigma: Tensor | float, cond: Tensor) -> Tensor:
        """Exact ``E[ε | x_σ = x, c] = Σ_k γ_k σ/v_k (x − (1−σ)μ_k)`` in ``x``'s dtype."""
        gamma, resid, var, sig = self._posterior(x, sigma, cond)
        return (gamma[..., None] * (sig / var)[..., None] * resid).sum(1).to(x.dtype).reshape(x.shape)

    def score(self, x: Tensor, sigma: Tensor | float, cond: Tensor) -> Tensor:
        """Exact ``∇_x log p_σ(x | c) = −Σ_k γ_k (x − (1−σ)μ_k)/v_k`` (finite at σ = 0) in ``x``'s dtype."""
        gamma, resid, var, _ = self._posterior(x, sigma, cond)
        return -(gamma[..., None] * resid / var[..., None]).sum(1).to(x.dtype).reshape(x.shape)

    def log_density(self, x: Tensor, sigma: Tensor | float, cond: Tensor) -> Tensor:
        """Exact ``log p_σ(x | c) = logsumexp_k (log W_k + log N(x; (1−σ)μ_k, v_k I))``, shape (B,), float64."""
        dt = self._calc_dtype()
        sig = self._sigma_column(sigma, x, dt)
        xx = x.reshape(x.shape[0], self.dim).to(dt)
        var = (1 - sig) ** 2 * self.stds.to(dt) ** 2 + sig**2
        resid = xx[:, None, :] - (1 - sig)[:, :, None] * self.means.to(dt)[None]
        logn = -0.5 * (resid**2).sum(-1) / var - 0.5 * self.dim * torch.log(2 * math.pi * var)
        return torch.logsumexp(torch.log(cond.to(device=xx.device, dtype=dt).clamp_min(0)) + logn, dim=1)

    def analytic_velocity(self, x: Tensor, sigma: Tensor | float, cond: Tensor) -> Tensor:
        """Exact teacher velocity ``v = ε̂ − x̂0`` (no merged adapters) in ``x``'s dtype."""
        gamma, resid, var, sig = self._posterior(x, sigma, cond)
        sd2 = self.stds.to(var.dtype) ** 2
        ex0 = self.means.to(var.dtype)[None] + ((1 - sig) * sd2 / var)[..., None] * resid
        eeps = (sig / var)[..., None] * resid
        return (gamma[..., None] * (eeps - ex0)).sum(1).to(x.dtype).reshape(x.shape)

    def _predict(self, x: Tensor, sigma: Tensor, cond: Tensor, role: str | None) -> Tensor:
        v = self.analytic_velocity(x, sigma, cond)
        for adapter in self.store.activate(role):  # merged, then the role's folds, then its own adapter
            v = v + adapter(x, sigma, cond).reshape(x.shape)
        return v

    # ---------------------------------------------------------------- exact sampling
    def sample_exact(self, prompts: Sequence[str], generator: torch.Generator | None = None) -> Tensor:
        """Exact clean samples of the *analytic* teacher, one per prompt, (N, d) float32 on the buffers' device."""
        w = self.encode_prompts(prompts, dtype=torch.float64)
        return sample_gaussian_mixture(self.means, self.stds, w, generator).to(torch.get_default_dtype())

    # ---------------------------------------------------------------- adapters (for the store)
    def _new_adapter(self) -> ResidualMLP:
        ref = self.means
        return ResidualMLP(self.dim, self.n_components, self.hidden, self.layers).to(device=ref.device)

    @staticmethod
    def _init_adapter(adapter: nn.Module, role: str, resets: int) -> None:
        """Fresh hidden layers seeded by hash(role, reset count), zero last layer (deterministic)."""
        adapter.reset(torch.Generator().manual_seed(stable_seed("toy2d-adapter", role, resets)))  # type: ignore[operator]

    def fsdp_units(self) -> Iterator[nn.Module]:
        """Each role adapter."""
        return iter(self.store.networks())
