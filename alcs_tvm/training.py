"""Training loops around the pruner: dense training, evaluation, and :func:`prune`, the batteries-included
ADMM -> hard prune -> fine-tune trainer that ``alcs prune`` and ``alcs flow`` run (torch only).

Users with their own training loop use :class:`alcs_tvm.pruning.ADMMPruner` directly instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .defaults import DEFAULT_RHO, DEFAULT_UPDATES_PER_EPOCH
from .pruning import ADMMPruner, describe_group_widths, expand_group_mask

__all__ = ["train_epoch", "evaluate", "train_dense", "PruneResult", "prune"]


def train_epoch(model, loader, optimizer, penalty=None, after_backward=None, after_batch=None) -> float:
    """One epoch; ``after_batch(i, batches)`` runs after the optimiser step of batch ``i`` (of ``batches``)."""
    model.train()
    total, n = 0.0, 0
    batches = len(loader) if hasattr(loader, "__len__") else None
    for i, (x, y) in enumerate(loader):
        loss = F.cross_entropy(model(x), y)
        full = loss + penalty() if penalty is not None else loss
        optimizer.zero_grad()
        full.backward()
        if after_backward is not None:
            after_backward()
        optimizer.step()
        if after_batch is not None:
            after_batch(i, batches)
        total += loss.item() * len(y)
        n += len(y)
    return total / max(n, 1)


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(y), batch_size))
    return correct / len(y)


def train_dense(model, data, epochs: int, lr: float = 3e-3, batch_size: int = 128, log=print, seed: int = 0):
    """Adam with the learning rate decayed to 0 over ``epochs`` (cosine): at a constant step the test accuracy
    keeps swinging from epoch to epoch, so pruning would start from a model caught on a swing rather than a
    converged one (docs/pruning.md)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs))
    for epoch in range(epochs):
        loss = train_epoch(model, data.loader(batch_size, seed=seed + epoch), opt)
        schedule.step()
        log(f"dense  epoch {epoch + 1}/{epochs}: loss {loss:.4f}  test acc {evaluate(model, data.x_test, data.y_test):.4f}")
    return model


@dataclass
class PruneResult:
    model: nn.Module
    layers: list  # PrunableLayer
    dense_accuracy: float
    accuracy: float
    dense_predicted_ms: float
    predicted_ms: float
    budget_ms: float
    sparsities: dict  # layer name -> fraction of SIMD groups pruned
    history: list = field(default_factory=list)  # per-epoch dicts
    measured_ms: float | None = None
    dense_measured_ms: float | None = None
    compile_report: object = None

    def table(self) -> str:
        rows = [("layer", "shape", "groups", "sparsity", "predicted ms")]
        for layer in self.layers:
            s = self.sparsities[layer.name]
            rows.append((layer.name, layer.spec.describe(), str(layer.num_groups), f"{s:.3f}",
                         f"{self._per_layer.get(layer.name, float('nan')):.4f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    _per_layer: dict = field(default_factory=dict)


def prune(model: nn.Module, data, table, budget_ms: float, *, group_width=None, admm_epochs: int = 6, finetune_epochs: int = 4, lr: float = 3e-3,
          finetune_lr: float | None = None, batch_size: int = 128, rho: float = DEFAULT_RHO, rho_multiplier: float = 1.6,
          importance: str = "l2", min_density: float = 0.01, rest_model: str | None = None,
          rest_ms: float | None = None, normalize: bool | str = True,
          updates_per_epoch: int = DEFAULT_UPDATES_PER_EPOCH, log=print, seed: int = 0) -> PruneResult:
    """ADMM -> hard prune -> fine-tune with fixed masks -> squash. ``model`` should be trained already (its
    accuracy is the dense reference). Returns a :class:`PruneResult` (the model is pruned in place). The ADMM
    epochs train at ``lr``; the fine-tune decays ``finetune_lr or lr`` to 0 (cosine), so the accuracy returned
    is where training settled, not where a constant step size left it on its last batch.

    ``updates_per_epoch``: Z/U-steps per ADMM epoch (evenly spaced over its batches; the last one ends the
    epoch); ``rho_multiplier`` stays the growth per epoch (``rho_multiplier ** (1 / updates_per_epoch)`` per
    update)."""
    if int(updates_per_epoch) < 1:
        raise ValueError(f"updates_per_epoch must be >= 1, got {updates_per_epoch!r}")
    updates_per_epoch = int(updates_per_epoch)
    torch.manual_seed(seed)
    input_shape = (1,) + tuple(data.x_train.shape[1:])
    dense_acc = evaluate(model, data.x_test, data.y_test)
    pruner = ADMMPruner(model, table, budget_ms, input_shape, group_width=group_width, rho=rho,
                        rho_multiplier=rho_multiplier ** (1.0 / updates_per_epoch), importance=importance,
                        min_density=min_density, rest_model=rest_model, rest_ms=rest_ms,
                        normalize=normalize).prepare()
    dense_ms = pruner.latency.dense_ms()
    log(f"dense: test acc {dense_acc:.4f}, predicted {dense_ms:.4f} ms; budget {budget_ms:.4f} ms "
        f"(minimum achievable {pruner.latency.min_ms(min_density):.4f} ms), {len(pruner.layers)} prunable convs, "
        f"V={describe_group_widths(pruner.layers)}")
    history = []
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    after = pruner.accumulate if importance == "taylor" else None

    def intermediate_update(i, batches):  # Z/U-steps inside the epoch; the epoch's last one is logged below
        every = max(1, -(-batches // updates_per_epoch)) if batches else 0
        if every and (i + 1) % every == 0 and i + 1 < batches:
            pruner.step()

    for epoch in range(admm_epochs):
        rho_now = pruner.rho
        loss = train_epoch(model, data.loader(batch_size, seed=seed + 100 + epoch), opt, pruner.penalty, after,
                           after_batch=intermediate_update if updates_per_epoch > 1 else None)
        stats = pruner.step()
        # accuracy of the current projection (what hard-pruning now would give, before fine-tuning)
        acc = _accuracy_with_plan(model, pruner, data)
        row = {"phase": "admm", "epoch": epoch + 1, "loss": loss, "accuracy": acc,
               "predicted_ms": stats["predicted_ms"], "rho": rho_now, "residual": stats["primal_residual"]}
        history.append(row)
        log(f"admm   epoch {epoch + 1}/{admm_epochs}: loss {loss:.4f}  acc(projected) {acc:.4f}  predicted "
            f"{stats['predicted_ms']:.4f} ms  rho {rho_now:.2e}  ||W-Z|| {stats['primal_residual']:.3f}")
    pruner.hard_prune()
    opt = torch.optim.Adam(model.parameters(), lr=finetune_lr or lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, finetune_epochs))  # see train_dense
    predicted = pruner.predicted_ms()
    for epoch in range(finetune_epochs):
        loss = train_epoch(model, data.loader(batch_size, seed=seed + 200 + epoch), opt)
        schedule.step()
        acc = evaluate(model, data.x_test, data.y_test)
        history.append({"phase": "finetune", "epoch": epoch + 1, "loss": loss, "accuracy": acc,
                        "predicted_ms": predicted, "rho": None})
        log(f"finetune epoch {epoch + 1}/{finetune_epochs}: loss {loss:.4f}  test acc {acc:.4f}  predicted "
            f"{predicted:.4f} ms")
    pruner.squash_mask()
    result = PruneResult(model, pruner.layers, dense_acc, evaluate(model, data.x_test, data.y_test), dense_ms,
                         predicted, budget_ms, pruner.sparsities(), history)
    result._per_layer = pruner.latency.breakdown(pruner.kept_counts())
    result.pruner = pruner
    return result


@torch.no_grad()
def _accuracy_with_plan(model, pruner: ADMMPruner, data, bn_batches: int = 16, batch_size: int = 64) -> float:
    """Test accuracy if the current plan were hard-pruned now. BatchNorm's running statistics describe the
    unpruned activations; with them a pruned MobileNetV2 scored at chance (0.08-0.13) and then 0.95 after one
    fine-tune epoch, so they are re-estimated on ``bn_batches`` training batches first (then restored)."""
    saved = [layer.module.weight.detach().clone() for layer in pruner.layers]
    for layer, keep in zip(pruner.layers, pruner.keep):
        layer.module.weight.mul_(expand_group_mask(keep, layer.module.weight.shape, layer.group_width))
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    norm_state = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]
    momenta = [m.momentum for m in norms]
    if norms:
        model.eval()  # only the norms update: dropout stays off and draws nothing from the training's RNG
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
            m.train()
        for i, (x, _) in enumerate(data.loader(batch_size, seed=0)):
            if i == bn_batches:
                break
            model(x)
    acc = evaluate(model, data.x_test, data.y_test)
    for m, state, momentum in zip(norms, norm_state, momenta):
        m.load_state_dict(state)
        m.momentum = momentum
    for layer, w in zip(pruner.layers, saved):
        layer.module.weight.copy_(w)
    return acc
