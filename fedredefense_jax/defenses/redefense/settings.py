"""FedREDefense's settings: :class:`RedefenseConfig`, with Table 7's per-dataset defaults
(:data:`TABLE7`) and the iteration counts of Appendix B.3's variants."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from fedredefense_jax.settings import ConfigError, Settings, setting

#: Table 7 of the paper, per dataset.
TABLE7 = {
    "fashion_mnist": dict(lr_images=0.5, lr_labels=0.2, alpha_init=0.1, lr_alpha=5e-6,
                          first_cap=800, later_cap=2000),
    "cifar10": dict(lr_images=0.1, lr_labels=0.05, alpha_init=0.05, lr_alpha=5e-5,
                    first_cap=500, later_cap=1500),
    "cinic10": dict(lr_images=0.1, lr_labels=0.05, alpha_init=0.05, lr_alpha=5e-5,
                    first_cap=2000, later_cap=4000),
}

_DATASET_ALIASES = {
    "fashion_mnist": "fashion_mnist", "fashion-mnist": "fashion_mnist",
    "fashionmnist": "fashion_mnist", "fmnist": "fashion_mnist",
    "cifar10": "cifar10", "cifar-10": "cifar10", "cifar": "cifar10",
    "cinic10": "cinic10", "cinic-10": "cinic10", "cinic": "cinic10",
}

#: Appendix B.3 iteration counts of the fixed-count variants: (first, later).
VARIANT_CAPS = {"continuous": (500, 60), "intermittent": (500, 500)}
DEFAULT_VARIANT = "dynamic"

VARIANTS = (DEFAULT_VARIANT, "continuous", "intermittent")
LAYOUTS = ("vmap", "map", "auto")


#: Registered rules that can aggregate the kept slots (setting ``redefense_aggregator``).
AGGREGATORS = ("fedavg", "median", "trimmed_mean", "norm_bound", "krum")


def _unroll(value):
    """``inner_unroll`` from a bool, an int or their text."""
    if isinstance(value, (bool, int)):
        return value
    text = str(value).lower()
    if text in ("true", "false"):
        return text == "true"
    return int(text)


def _table7(name: str, help: str, **spec):
    """A setting whose unset value is Table 7's for the dataset (CIFAR-10's default here)."""
    return setting(TABLE7["cifar10"][name], f"{help} (Table 7's for the dataset).", **spec)


@dataclasses.dataclass(frozen=True)
class RedefenseConfig(Settings):
    """Settings of FedREDefense (defaults: Section 5.1.4, Table 7, Appendix B.3).

    Setting names are the attribute names, with ``redefense_`` before the attributes from
    ``variant`` on (``redefense_variant``, ``redefense_layout``, ...), which would be
    ambiguous among all plug-ins' settings.

    Attributes:
      gamma: reconstruction-error threshold (0.6).
      inner_steps: ``N``, full-batch steps of the virtual model (5).
      images_per_class: synthetic images per class (1, i.e. 10 images for 10 classes).
      lr_images, lr_labels, lr_alpha: outer SGD learning rates (Table 7).
      alpha_init: initial inner learning rate (Table 7 "Virtual Model LR").
      first_cap: max outer iterations at a client's first participation (dynamic), or the
        fixed count ``M`` of the other variants. Set below Table 7's, it is the budget rule:
        a first update not reconstructed to gamma within ``first_cap`` iterations is flagged
        (``separability.budget`` chooses it from benign runs of a setting).
      later_cap: max outer iterations later (dynamic), or ``M'`` of the other variants.
      variant: 'dynamic' | 'continuous' | 'intermittent'.
      interval: ``T_I`` of the intermittent variant (10 rounds).
      momentum: SGD momentum of the three outer optimisers (0.5).
      reset_momentum: zero the momentum buffers at every participation (authors' code).
      layout: 'vmap' | 'map' | 'auto' (map on CPU, vmap elsewhere).
      chunk: largest number of outer iterations per compiled chunk.
      first_chunk: iterations of the first chunk; doubles up to ``chunk``.
      map_batch_size: ``batch_size`` of ``lax.map`` (None: one client at a time).
      init_noise: 'normal' (N(0,1), the authors') or 'uniform' (U[-1, 1]).
      inner_unroll: ``lax.scan`` unroll of the inner loop (True: fully unrolled, the
        default: on CPU a rolled scan ran the Table 5 CNN's outer step ~2x slower; 1:
        rolled, faster to compile).
      aggregator: rule aggregating the kept slots: a name of :data:`AGGREGATORS` or a
        callable ``(updates[S, P], weights[S]) -> [P]``.
      reject_at, reject_above: early rejection (off when unset): a reconstruction whose
        loss after ``reject_at`` outer iterations is above ``reject_above`` (>= gamma) stops
        there, its error that loss, so it is flagged without running to the cap.
    """

    gamma: float = setting(0.6, "FedREDefense: reconstruction-error threshold (paper: 0.6).", above=0)
    inner_steps: int = setting(5, "FedREDefense: inner GD steps N of the virtual model (paper: 5).", low=1)
    images_per_class: int = setting(1, "FedREDefense: synthetic images per class (paper: 1).", low=1)
    lr_images: float = _table7("lr_images", "FedREDefense: outer LR of the synthetic images", low=0)
    lr_labels: float = _table7("lr_labels", "FedREDefense: outer LR of the label logits", low=0)
    lr_alpha: float = _table7("lr_alpha", "FedREDefense: outer LR of alpha", low=0)
    alpha_init: float = _table7("alpha_init", "FedREDefense: initial virtual-model LR alpha", above=0)
    first_cap: int = _table7("first_cap", "FedREDefense: outer-iteration cap at a client's first participation, "
                             "or the budget of the budget rule (experiments/calibrate_rule.py)",
                             low=1)
    later_cap: int = _table7("later_cap", "FedREDefense: outer-iteration cap later", low=1)
    variant: str = setting(DEFAULT_VARIANT, "FedREDefense: optimisation schedule of Appendix B.3.",
                           choices=VARIANTS, name="redefense_variant")
    interval: int = setting(10, "FedREDefense: rounds T_I between the intermittent variant's optimisations.",
                            low=1, name="redefense_interval")
    momentum: float = setting(0.5, "FedREDefense: SGD momentum of the outer optimisers.", low=0,
                              name="redefense_momentum")
    reset_momentum: bool = setting(True, "FedREDefense: zero the momentum buffers at every participation "
                                   "(the authors' code).", name="redefense_reset_momentum")
    layout: str = setting("auto", "FedREDefense: reconstruction batching over clients (auto = map on CPU, "
                          "vmap elsewhere).", choices=LAYOUTS, name="redefense_layout")
    chunk: int = setting(128, "FedREDefense: largest number of outer iterations per compiled chunk.", low=1,
                         name="redefense_chunk")
    first_chunk: int = setting(8, "FedREDefense: outer iterations of the first chunk (doubling up to "
                               "redefense_chunk).", low=1, name="redefense_first_chunk")
    map_batch_size: Optional[int] = setting(None, "FedREDefense: batch_size of lax.map over clients (unset: one "
                                            "at a time).", low=1, name="redefense_map_batch_size")
    init_noise: str = setting("normal", "FedREDefense: initial synthetic images, normal N(0, 1) (the authors') "
                              "or uniform U[-1, 1].", choices=("normal", "uniform"), name="redefense_init_noise")
    inner_unroll: Any = setting(True, "FedREDefense: lax.scan unroll of the inner loop (true: fully unrolled; "
                                "1: rolled, faster to compile).", parse=_unroll, name="redefense_inner_unroll")
    aggregator: Any = setting("fedavg", "FedREDefense: rule aggregating the kept updates.", choices=AGGREGATORS,
                              name="redefense_aggregator")
    reject_at: Optional[int] = setting(None, "FedREDefense: early rejection: after this many outer iterations a "
                                       "reconstruction whose loss is above redefense_reject_above stops (and is "
                                       "flagged): a speed-up, or the loss rule (experiments/calibrate_rule.py); "
                                       "unset: off.", low=1, name="redefense_reject_at")
    reject_above: Optional[float] = setting(None, "FedREDefense: the loss bound of early rejection (at least "
                                            "gamma).", above=0, name="redefense_reject_above")

    def check(self, experiment) -> None:
        if (self.reject_at is None) != (self.reject_above is None):
            given = "redefense_reject_at" if self.reject_at is not None else "redefense_reject_above"
            raise ConfigError(given, "early rejection needs both redefense_reject_at and redefense_reject_above")
        if self.reject_above is not None and self.reject_above < self.gamma:
            raise ConfigError("redefense_reject_above", f"{self.reject_above} is below gamma ({self.gamma}): it "
                                                        "would flag reconstructions the paper's rule keeps")

    @classmethod
    def defaults(cls, given, dataset):
        """Table 7 for ``dataset`` (CIFAR-10's when unknown), then the caps of the given
        ``redefense_variant`` (Appendix B.3)."""
        base = dict(TABLE7.get(canonical_dataset(dataset) or "cifar10"))
        variant = given.get("redefense_variant", DEFAULT_VARIANT)
        if variant in VARIANT_CAPS:
            base["first_cap"], base["later_cap"] = VARIANT_CAPS[variant]
        return base


def canonical_dataset(name: str) -> Optional[str]:
    """Table 7 key of a dataset name (aliases accepted), None when unknown."""
    return _DATASET_ALIASES.get(str(name).lower())


def make_config(dataset: str, overrides: Optional[dict] = None) -> RedefenseConfig:
    """Config with Table 7 defaults for ``dataset`` (CIFAR-10's when unknown), the variant's
    Appendix B.3 iteration counts, then ``overrides`` (``{setting name: value}``; None
    values count as unset; an unknown name raises ConfigError)."""
    return RedefenseConfig.parse(overrides, owner="defense fedredefense", dataset=dataset)
