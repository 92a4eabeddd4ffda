"""Latency-constrained SIMD-structured pruning (ALCS, Zhao et al. 2021) in PyTorch.

**Structure.** A prunable group is ``V`` consecutive output channels at one ``(cin, kh, kw)`` of a ``groups == 1``
``nn.Conv2d`` weight ``W[Cout, Cin, Kh, Kw]`` - exactly the V-wide vector the sparse kernel skips (see
:mod:`alcs_tvm.sparse_format`; ``Cout`` not a multiple of ``V`` -> the last block is zero-padded). ``V`` comes from
the target (32/16 AVX-512, 8 AVX2, 8/4 NEON). Linear layers and depthwise convs stay dense (their time is part of
the latency table's "rest of model").

**Latency model.** A layer's latency is ``table.layer_latency(spec, V, sparsity)`` (piece-wise linear in the
fraction of its groups pruned, the faster of sparse and dense), ``spec`` the layer's :class:`Conv2dSpec` at the
model's input size, captured with forward hooks. A model's latency is the sum over its prunable convs plus the
table's ``rest_ms`` for the model (when present). Where the table's entry for the model fitted a cache size, a
configuration's total is the table's own prediction for it: a model whose weights fit in the caches once pruned
pays less per layer than the unpruned model's cache state the per-layer values hold
(:meth:`alcs_tvm.latency.LatencyTable.predict`).

**Projection (Z-step).** Given scores ``s_g`` (the squared L2 norm of each group of ``W + U``), choose per layer
how many groups ``k_i`` to keep - always its ``k_i`` highest-scoring ones - maximising ``sum_i S_i(k_i)``
(``S_i`` = prefix sum of the layer's sorted scores) s.t. ``sum_i L_i(k_i) + rest <= budget``. With squared
norms as scores this *is* the Euclidean projection of ``W + U`` onto the feasible set (the discarded squared
norm is minimised), which is what ADMM's Z-step asks for.

It is solved by an **exact knapsack DP over the layers' keep counts**, not by a greedy: the latency curve is
``min(dense, piece-wise linear sparse)``, which is flat (zero ms saved per pruned group) until the sparse kernel
beats the dense one and need not be convex, so "least importance per marginal ms" has nothing to rank on a
plateau and can stop in a worse local choice; the DP handles any curve. Latencies are rounded *up* to
``budget / bins`` units, so a DP-feasible plan is feasible under the real (unrounded) model - the projection
never exceeds the budget - at the cost of at most ``layers / bins`` of the budget left unused (0.1% for 4
layers at 4000 bins); afterwards each layer's count is raised at full resolution while the unrounded total
stays within the budget. Keep counts are searched on <= ``max_candidates`` points per layer (all counts for small
layers, plus the latency grid's breakpoints), cost ``O(layers * bins * candidates)`` - milliseconds.

**ADMM** (Zhang et al. 2018, as in ALCS): W-step = the user's optimiser on ``loss + rho/2 ||W - Z + U||^2``
(:meth:`ADMMPruner.penalty`); Z-step = the projection of ``W + U``; U-step ``U += W - Z``; ``rho`` grows
geometrically each :meth:`ADMMPruner.step` (``rho_multiplier``, capped at ``rho_max``). Then
:meth:`ADMMPruner.hard_prune` fixes masks to Z's support (``torch.nn.utils.prune``), the model is fine-tuned with
the masks fixed, and :meth:`ADMMPruner.squash_mask` makes the zeros permanent for export.

Use in your own loop (like ``torch.ao.pruning`` sparsifiers)::

    pruner = ADMMPruner(model, table, budget_ms=0.05, input_shape=(1, 1, 28, 28))  # table: a LatencyTable
    pruner.prepare()
    for epoch in range(admm_epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y) + pruner.penalty()
            opt.zero_grad(); loss.backward(); opt.step()
        pruner.step()                      # Z-, U-step, rho schedule
    pruner.hard_prune()                    # masks = support of Z
    ...fine-tune (masks stay applied)...
    pruner.squash_mask()                   # plain weights with zeros; torch.onnx.export keeps them

or :func:`alcs_tvm.training.prune` (the batteries-included trainer the ``alcs prune`` command uses).

This module imports torch and nothing of TVM: the latency model comes in as an object (``table``), and the pruning
group widths as a number or an object that gives each layer's (``group_width``).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from .defaults import DEFAULT_RHO
from .layer import Conv2dSpec
from .sparse_format import layer_group_width, num_blocks
from .zoo import export_onnx

__all__ = ["PrunableLayer", "find_prunable_layers", "group_scores", "group_mask", "expand_group_mask",
           "LatencyModel", "project", "ADMMPruner", "magnitude_prune", "export_pruned", "BudgetError",
           "over_budget_hint", "check_budget", "describe_group_widths"]


class BudgetError(ValueError):
    """The latency budget cannot be met (or is not a positive number)."""


#: measured latency above the budget by more than this gets :func:`over_budget_hint` (about the spread of
#: repeated timings of one build)
OVER_BUDGET_TOLERANCE = 0.02


def over_budget_hint(budget_ms: float, predicted_ms: float, measured_ms: float | None) -> list:
    """``[]``, or one line when the device measured the pruned model over the budget: the budget that would have
    put this plan's measurement on it (the plan's measured / predicted ratio, applied backwards)."""
    if not measured_ms or measured_ms <= budget_ms * (1 + OVER_BUDGET_TOLERANCE):
        return []
    return [f"over budget: measured {measured_ms:.4f} ms against {budget_ms:.4f} ms; the table predicted this plan "
            f"{(1 - predicted_ms / measured_ms) * 100:.0f}% low on this device - run again with --budget-ms "
            f"{budget_ms * predicted_ms / measured_ms:.4f}"]


# ------------------------------------------------------------------------------------------------ structure
@dataclass
class PrunableLayer:
    name: str
    module: nn.Conv2d
    spec: Conv2dSpec
    group_width: int  # V: output channels per pruning group

    @property
    def blocks(self) -> int:
        return num_blocks(self.spec.out_channels, self.group_width)

    @property
    def positions(self) -> int:
        return self.spec.in_channels * self.spec.kernel[0] * self.spec.kernel[1]

    @property
    def num_groups(self) -> int:
        return self.blocks * self.positions


def _conv_spec(module: nn.Conv2d, input_shape) -> Conv2dSpec:
    if isinstance(module.padding, str):
        raise ValueError(f"string padding {module.padding!r} is not supported; use explicit padding")
    return Conv2dSpec.create(input_shape, module.weight.shape, module.stride, tuple(module.padding),
                             module.dilation)


@torch.no_grad()
def find_prunable_layers(model: nn.Module, input_shape, group_width) -> list:
    """The ``groups == 1`` convs of ``model``, each with its :class:`Conv2dSpec` at ``input_shape`` (captured by
    forward hooks on one zero input), in execution order. ``group_width``: the group width of every layer, or an
    object whose ``group_width(out_channels)`` gives each layer's (a :class:`~alcs_tvm.target.TargetInfo`)."""
    seen, hooks = [], []
    names = {m: n for n, m in model.named_modules()}
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.groups == 1:
            hooks.append(module.register_forward_hook(
                lambda m, inputs, output: seen.append((m, tuple(inputs[0].shape)))))
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(*input_shape))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    layers, done = [], set()
    for module, shape in seen:
        if module in done:
            raise ValueError(f"conv {names[module]} runs more than once per forward pass; not supported")
        done.add(module)
        spec = _conv_spec(module, shape)
        layers.append(PrunableLayer(names[module], module, spec, layer_group_width(group_width, spec.out_channels)))
    if not layers:
        raise ValueError("the model has no prunable (groups == 1) Conv2d layer")
    return layers


def describe_group_widths(layers) -> str:
    """``"16"`` or ``"32/16 (12 layers at 32)"``: the layers' pruning group widths."""
    widths = sorted({layer.group_width for layer in layers}, reverse=True)
    if len(widths) == 1:
        return str(widths[0])
    return "/".join(map(str, widths)) + f" ({sum(layer.group_width == widths[0] for layer in layers)} of " \
        f"{len(layers)} layers at {widths[0]})"


def _blocked(weight: torch.Tensor, group_width: int) -> torch.Tensor:
    """``[blocks, V, positions]`` view of ``weight`` (output channels zero-padded to a multiple of V)."""
    cout = weight.shape[0]
    flat = weight.reshape(cout, -1)
    pad = num_blocks(cout, group_width) * group_width - cout
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad, flat.shape[1])])
    return flat.reshape(-1, group_width, flat.shape[1])


def group_scores(weight: torch.Tensor, group_width: int) -> torch.Tensor:
    """Squared L2 norm of every SIMD group: ``[blocks, Cin*Kh*Kw]``."""
    return _blocked(weight.detach().float(), group_width).pow(2).sum(dim=1)


def group_mask(weight: torch.Tensor, group_width: int) -> torch.Tensor:
    """Boolean ``[blocks, positions]``: groups with any non-zero weight (= :func:`sparse_format.block_mask`)."""
    return (_blocked(weight.detach(), group_width) != 0).any(dim=1)


def expand_group_mask(keep: torch.Tensor, weight_shape, group_width: int) -> torch.Tensor:
    """``[blocks, positions]`` group keep-mask -> float weight mask of ``weight_shape``."""
    cout = weight_shape[0]
    full = keep[:, None, :].expand(-1, group_width, -1).reshape(-1, keep.shape[1])[:cout]
    return full.reshape(weight_shape).float()


def _keep_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    if k > 0:
        keep[torch.argsort(scores.flatten(), descending=True, stable=True)[:k]] = True
    return keep.reshape(scores.shape)


# ----------------------------------------------------------------------------------------------- latency
class LatencyModel:
    """Predicted latency of a model's prunable layers as a function of their keep counts.

    ``table``: any object with ``profile_for(spec, group_width)`` returning a layer's latency curve (an object with
    ``latency(sparsity)`` and its grid ``sparsities``), such as :class:`alcs_tvm.latency.LatencyTable`; ``rest_ms``:
    the time of everything else in the model; ``rest_model``: the table's entry for the model, whose cache size
    (when the profiler fitted one) makes totals follow each configuration's weight footprint. Per-layer costs
    (:meth:`layer_ms`, which the projection's knapsack adds up) stay in the unpruned model's cache state: pruning
    only shrinks the footprint, so they bound the configuration's total from above."""

    def __init__(self, table, layers: list, rest_ms: float = 0.0, rest_model: str | None = None):
        self.table, self.layers, self.rest_ms = table, layers, float(rest_ms)
        entry = getattr(table, "models", {}).get(rest_model, {}) if rest_model else {}
        self.rest_model = rest_model if entry.get("cache_bytes") else None
        missing = []
        self.profiles = []
        for layer in layers:
            try:
                self.profiles.append(table.profile_for(layer.spec, layer.group_width))
            except (KeyError, ValueError):  # (the table raises either, depending on its version)
                missing.append(f"{layer.name} ({layer.spec.describe()}, V={layer.group_width})")
        if missing:
            raise ValueError("the latency table has no entry for: " + "; ".join(missing) +
                             " - profile this model (alcs profile) at this input size and target")

    def layer_ms(self, i: int, kept: int) -> float:
        n = self.layers[i].num_groups
        return self.profiles[i].latency(1.0 - kept / n)

    def total_ms(self, kept_counts) -> float:
        return self.rest_ms + sum(self.breakdown(kept_counts).values())

    def breakdown(self, kept_counts) -> dict:
        """Each layer's ms in this configuration (its cache state, where the table models one)."""
        if self.rest_model is None:
            return {layer.name: self.layer_ms(i, k) for i, (layer, k) in enumerate(zip(self.layers, kept_counts))}
        rows = [(layer.name, layer.spec, layer.group_width, 1.0 - k / layer.num_groups)
                for layer, k in zip(self.layers, kept_counts)]
        predicted = self.table.predict(rows, self.rest_model)[1]
        return {layer.name: predicted[layer.name] for layer in self.layers}

    def dense_ms(self) -> float:
        return self.total_ms([layer.num_groups for layer in self.layers])

    def min_keep(self, min_density: float) -> list:
        return [max(1, math.ceil(min_density * layer.num_groups)) for layer in self.layers]

    def candidates(self, i: int, min_keep: int, max_candidates: int = 256) -> np.ndarray:
        """Keep counts searched for layer ``i``: every count for small layers, else an even grid plus the counts
        at the latency grid's breakpoints (where the piece-wise linear curve bends)."""
        n = self.layers[i].num_groups
        if n - min_keep + 1 <= max_candidates:
            return np.arange(min_keep, n + 1)
        ks = set(np.linspace(min_keep, n, max_candidates).round().astype(int).tolist())
        for s in self.profiles[i].sparsities:
            for k in (math.floor((1 - s) * n), math.ceil((1 - s) * n)):
                if min_keep <= k <= n:
                    ks.add(k)
        return np.array(sorted(ks))

    def min_plan(self, min_density: float) -> list:
        """Per-layer keep counts of the smallest latency reachable keeping >= ``min_density`` of each layer."""
        plan = []
        for i, k0 in enumerate(self.min_keep(min_density)):
            n = self.layers[i].num_groups
            ks = self.candidates(i, k0, n + 1 if n <= 4096 else 4096)
            plan.append(int(min(ks, key=lambda k: (self.layer_ms(i, int(k)), -k))))
        return plan

    def min_ms(self, min_density: float) -> float:
        """The smallest latency reachable keeping at least ``min_density`` of each layer's groups."""
        return self.total_ms(self.min_plan(min_density))


def project(scores: list, latency: LatencyModel, budget_ms: float, *, min_density: float = 0.0,
            bins: int = 4000, max_candidates: int = 256) -> list:
    """Keep masks (``[blocks, positions]`` bool per layer) maximising the kept score s.t. predicted latency <=
    ``budget_ms``: the exact DP described in the module docstring. Raises :class:`BudgetError` when infeasible."""
    check_budget(latency, budget_ms, min_density)
    layers = latency.layers
    min_keep = latency.min_keep(min_density)
    avail = budget_ms - latency.rest_ms
    unit = avail / bins
    sorted_scores = [torch.sort(s.flatten().double(), descending=True).values.numpy() for s in scores]
    prefix = [np.concatenate([[0.0], np.cumsum(s)]) for s in sorted_scores]
    best = np.zeros(bins + 1)  # best[b]: max kept score of the layers so far with rounded cost <= b
    choices = []
    for i, layer in enumerate(layers):
        ks = latency.candidates(i, min_keep[i], max_candidates)
        costs = np.array([math.ceil(latency.layer_ms(i, int(k)) / unit - 1e-9) for k in ks])
        values = prefix[i][ks]
        new = np.full(bins + 1, -np.inf)
        arg = np.full(bins + 1, -1)
        for j, (c, v) in enumerate(zip(costs, values)):
            if c > bins:
                continue
            cand = np.full(bins + 1, -np.inf)
            cand[c:] = best[: bins + 1 - c] + v
            better = cand > new
            new[better], arg[better] = cand[better], j
        choices.append((ks, costs, arg))
        best = new
    if np.isfinite(best[bins]):
        kept, b = [0] * len(layers), bins
        for i in reversed(range(len(layers))):
            ks, costs, arg = choices[i]
            j = arg[b]
            kept[i] = int(ks[j])
            b -= costs[j]
    else:  # a budget within the rounding of the minimum: start from the fastest plan
        kept = latency.min_plan(min_density)
    kept = _within_budget(latency, kept, budget_ms, min_keep)
    # use the slack the rounding left: raise each count at full resolution while the true total fits
    for i, layer in enumerate(layers):
        trial = _with_count(kept, i, _largest_fitting(latency, kept, i, kept[i], layer.num_groups, budget_ms))
        if latency.total_ms(trial) <= budget_ms:
            kept = trial
    assert latency.total_ms(kept) <= budget_ms + 1e-9
    return [_keep_top(s, k) for s, k in zip(scores, kept)]


def _within_budget(latency: LatencyModel, kept: list, budget_ms: float, min_keep: list) -> list:
    """``kept`` with counts lowered, costliest layer first, until the total fits: the knapsack's per-layer costs
    bound a configuration's total from above only where a layer's cold timing is not below its warm one (timing
    noise can put it there), so its plan can miss the budget by that noise."""
    for i in sorted(range(len(kept)), key=lambda i: -latency.layer_ms(i, kept[i])):
        if latency.total_ms(kept) <= budget_ms:
            break
        kept = _with_count(kept, i, _largest_fitting(latency, kept, i, min_keep[i], kept[i], budget_ms))
    return kept


def _with_count(kept: list, i: int, count: int) -> list:
    return kept[:i] + [count] + kept[i + 1:]


def _largest_fitting(latency: LatencyModel, kept: list, i: int, lo: int, hi: int, budget_ms: float) -> int:
    """The largest count of layer ``i`` in ``[lo, hi]`` whose total fits the budget, by bisection (``hi`` itself
    when it fits: the curve need not be monotone); ``lo`` when none does."""
    if latency.total_ms(_with_count(kept, i, hi)) <= budget_ms:
        return hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if latency.total_ms(_with_count(kept, i, mid)) <= budget_ms:
            lo = mid
        else:
            hi = mid - 1
    return lo


def check_budget(latency: LatencyModel, budget_ms, min_density: float = 0.0):
    """Raise :class:`BudgetError` (with the minimum achievable latency) for a budget that cannot be met."""
    minimum = latency.min_ms(min_density)
    where = (f"the minimum achievable latency under the table is {minimum:.4f} ms (dense {latency.dense_ms():.4f} "
             f"ms, keeping at least {min_density:.0%} of each layer's groups)")
    if budget_ms is None or not isinstance(budget_ms, (int, float)) or not math.isfinite(budget_ms) \
            or budget_ms <= 0:
        raise BudgetError(f"latency budget must be a positive number of ms, got {budget_ms!r}; {where}")
    if budget_ms < minimum:
        raise BudgetError(f"latency budget {budget_ms:.4f} ms is below what this model can reach: {where}")


# --------------------------------------------------------------------------------------------------- ADMM


class ADMMPruner:
    """ADMM latency-constrained SIMD-group pruning; see the module docstring for the loop.

    ``importance``: ``"l2"`` (squared group norm of ``W + U``; the exact Euclidean projection) or ``"taylor"``
    (gradient-aware: squared norm weighted by the group's accumulated ``(w * dL/dw)^2``, normalised per layer;
    call :meth:`accumulate` after each ``backward``).

    ``normalize`` (default ``True`` = ``"sum"``) divides each layer's scores by the layer's total, so a group is
    worth its share of its layer's squared norm; ``"mean"`` divides by the mean group score; ``False`` keeps raw
    squared norms (then the Z-step is exactly the Euclidean projection; normalised, it is the projection in a
    per-layer-weighted norm). Raw or mean-normalised scores value one of a small first conv's few groups like one
    of a wide layer's hundreds, and prune the first layer to nearly nothing (docs/pruning.md)."""

    def __init__(self, model: nn.Module, table, budget_ms: float, input_shape, *, group_width=None,
                 rho: float = DEFAULT_RHO, rho_multiplier: float = 1.6, rho_max: float = 1.0, importance: str = "l2",
                 min_density: float = 0.01, rest_ms: float | None = None, rest_model: str | None = None,
                 bins: int = 4000, normalize: bool | str = True):
        if importance not in ("l2", "taylor"):
            raise ValueError(f"importance must be 'l2' or 'taylor', got {importance!r}")
        if group_width is None:  # the group widths of the target the table was measured on, per layer
            group_width = table.target_info()
        self.model, self.table, self.budget_ms = model, table, budget_ms
        self.input_shape, self.group_width = tuple(input_shape), group_width
        self.rho, self.rho_multiplier, self.rho_max = rho, rho_multiplier, rho_max
        self.importance, self.min_density, self.bins = importance, min_density, bins
        self.normalize = normalize
        if rest_ms is None:
            rest_ms = table.rest_ms.get(rest_model, 0.0) if rest_model else 0.0
        self.rest_ms, self.rest_model = float(rest_ms), rest_model
        self.layers: list = []
        self.latency: LatencyModel | None = None
        self.Z: list = []
        self.U: list = []
        self.keep: list = []
        self._taylor: list = []
        self.masks_applied = False

    # -- set-up ---------------------------------------------------------------------------------------------
    def prepare(self):
        """Find the layers and their specs, check the budget, initialise ``Z = proj(W)``, ``U = 0``."""
        self.layers = find_prunable_layers(self.model, self.input_shape, self.group_width)
        self.latency = LatencyModel(self.table, self.layers, self.rest_ms, self.rest_model)
        check_budget(self.latency, self.budget_ms, self.min_density)
        self.U = [torch.zeros_like(layer.module.weight) for layer in self.layers]
        self._taylor = [torch.zeros(layer.blocks, layer.positions) for layer in self.layers]
        self._z_step()
        return self

    # -- the three steps --------------------------------------------------------------------------------------
    def penalty(self) -> torch.Tensor:
        """``rho/2 * sum ||W - Z + U||^2``: add to the task loss in the W-step."""
        total = 0.0
        for layer, z, u in zip(self.layers, self.Z, self.U):
            total = total + (layer.module.weight - z + u).pow(2).sum()
        return 0.5 * self.rho * total

    def accumulate(self):
        """For ``importance="taylor"``: add this batch's ``(w * grad)^2`` per group (call after backward)."""
        for i, layer in enumerate(self.layers):
            g = layer.module.weight.grad
            if g is not None:
                self._taylor[i] += group_scores(layer.module.weight.detach() * g, layer.group_width)

    def scores(self, tensors=None) -> list:
        tensors = tensors if tensors is not None else [layer.module.weight.detach() for layer in self.layers]
        out = []
        for i, (layer, t) in enumerate(zip(self.layers, tensors)):
            s = group_scores(t, layer.group_width)
            if self.importance == "taylor" and self._taylor[i].sum() > 0:
                t_score = self._taylor[i] / self._taylor[i].mean()
                s = s * (1.0 + t_score)
            if self.normalize == "mean":
                s = s / s.mean().clamp_min(1e-30)
            elif self.normalize:  # "sum" / True: a group's share of its layer's squared norm
                s = s / s.sum().clamp_min(1e-30)
            out.append(s)
        return out

    def _z_step(self):
        with torch.no_grad():
            targets = [layer.module.weight.detach() + u for layer, u in zip(self.layers, self.U)]
            self.keep = project(self.scores(targets), self.latency, self.budget_ms, min_density=self.min_density,
                                bins=self.bins)
            self.Z = [t * expand_group_mask(k, t.shape, layer.group_width)
                      for layer, t, k in zip(self.layers, targets, self.keep)]
        for i in range(len(self._taylor)):
            self._taylor[i].zero_()

    def step(self) -> dict:
        """Z-step (projection of ``W + U``), U-step (``U += W - Z``), then ``rho *= rho_multiplier``."""
        self._z_step()
        with torch.no_grad():
            gap = 0.0
            for layer, z, u in zip(self.layers, self.Z, self.U):
                diff = layer.module.weight.detach() - z
                u += diff
                gap += float(diff.pow(2).sum())
        stats = {"rho": self.rho, "primal_residual": math.sqrt(gap), "predicted_ms": self.predicted_ms()}
        self.rho = min(self.rho * self.rho_multiplier, self.rho_max)
        return stats

    # -- results -----------------------------------------------------------------------------------------------
    def kept_counts(self) -> list:
        return [int(k.sum()) for k in self.keep]

    def predicted_ms(self) -> float:
        """Predicted latency of the current plan (Z's support)."""
        return self.latency.total_ms(self.kept_counts())

    def sparsities(self) -> dict:
        """Fraction of each layer's SIMD groups pruned in the current plan."""
        return {layer.name: 1.0 - int(k.sum()) / layer.num_groups for layer, k in zip(self.layers, self.keep)}

    def hard_prune(self):
        """Zero everything outside Z's support and fix the masks (``torch.nn.utils.prune``) for fine-tuning."""
        for layer, keep in zip(self.layers, self.keep):
            mask = expand_group_mask(keep, layer.module.weight.shape, layer.group_width)
            torch_prune.custom_from_mask(layer.module, "weight", mask)
        self.masks_applied = True

    def state_dict(self) -> dict:
        """The pruner's state (``rho``, ``Z``, ``U``, the current plan, Taylor scores), as in ``torch.ao.pruning``:
        save it beside the model's to resume ADMM where it stopped."""
        return {"rho": self.rho, "Z": [z.clone() for z in self.Z], "U": [u.clone() for u in self.U],
                "keep": [k.clone() for k in self.keep], "taylor": [t.clone() for t in self._taylor],
                "layers": [layer.name for layer in self.layers]}

    def load_state_dict(self, state: dict):
        """Restore :meth:`state_dict` into a pruner prepared (:meth:`prepare`) on the same model."""
        names = [layer.name for layer in self.layers]
        if list(state.get("layers", [])) != names:
            raise ValueError(f"pruner state is for layers {state.get('layers')}, this pruner has {names}")
        self.rho = float(state["rho"])
        self.Z = [z.clone() for z in state["Z"]]
        self.U = [u.clone() for u in state["U"]]
        self.keep = [k.clone() for k in state["keep"]]
        self._taylor = [t.clone() for t in state["taylor"]]
        return self

    def squash_mask(self):
        """Make the masks permanent: plain ``weight`` parameters with the zeros in them."""
        for layer in self.layers:
            if torch_prune.is_pruned(layer.module):
                torch_prune.remove(layer.module, "weight")
        self.masks_applied = False


@torch.no_grad()
def magnitude_prune(layers: list, keep_fraction: float | list):
    """Baseline: keep the top ``keep_fraction`` (per layer, or one for all) of each layer's SIMD groups by L2
    norm; masks fixed with ``torch.nn.utils.prune`` (squash with ``torch.nn.utils.prune.remove``)."""
    fractions = keep_fraction if isinstance(keep_fraction, (list, tuple)) else [keep_fraction] * len(layers)
    for layer, frac in zip(layers, fractions):
        w = layer.module.weight
        k = max(1, int(round(frac * layer.num_groups)))
        keep = _keep_top(group_scores(w, layer.group_width), k)
        torch_prune.custom_from_mask(layer.module, "weight", expand_group_mask(keep, w.shape, layer.group_width))


# --------------------------------------------------------------------------------------------------- export
def export_pruned(model: nn.Module, path: str, input_shape) -> str:
    """``torch.onnx.export`` (via :func:`alcs_tvm.zoo.export_onnx`) with the zeros intact; masks still attached
    by ``torch.nn.utils.prune`` are squashed on a copy first."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if torch_prune.is_pruned(m) and hasattr(m, "weight_mask"):
            torch_prune.remove(m, "weight")
    return export_onnx(model, path, input_shape)


