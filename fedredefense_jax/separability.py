"""How well FedREDefense's reconstruction trajectory separates benign from malicious updates.

One *participation* is one client's update in one round, reconstructed by FedREDefense. Three
kinds of score are read from its record (larger = more suspicious):

* ``error``: the final reconstruction error ``||g - g_hat||^2 / ||g||^2`` (the paper flags
  ``error > gamma``);
* ``iterations``: the outer iterations until the error first fell to gamma or below
  (``to_gamma``); the iterations run (the cap) + 1 when it never did;
* ``loss@b``: the loss after ``b`` outer iterations (``loss_at``, b in ``BUDGETS``); a
  reconstruction that reached gamma before ``b`` stopped there and its final error stands in.

For each score: the area under the ROC curve (malicious = positive) and the *clean catch*:
the fraction of malicious participations scoring above every benign participation of the
same group, i.e. the true-positive rate of the best threshold with no false positive.
Records written before trajectories were recorded have no ``loss@b``; their
``iterations`` come from the number of iterations run (a reconstruction stops at gamma).
Updates whose error is undefined (non-finite, or of zero or overflowing norm, e.g. MPAF's
in round 1, when the global model is still the initial one) are flagged before any
reconstruction (``invalid``): they have no score and are counted apart.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from fedredefense_jax import records
from fedredefense_jax.defenses.redefense import BUDGETS


class Participation(NamedTuple):
    """One reconstructed update.

    Attributes:
      attack: the run's attack (``none`` for a run without one).
      round: the round, from 1.
      client: the client id.
      malicious: whether the client is one of the run's attackers (never in a run without attack).
      first: whether this is the client's first participation (the first-participation cap).
      error: final reconstruction error (NaN for an invalid update).
      iterations: outer iterations to reach gamma; ``None`` when it never did.
      ran: outer iterations run (the cap when gamma was never reached).
      loss_at: the loss after each of ``BUDGETS`` iterations (``None`` where not run or not
        recorded), or ``None`` for records without trajectories.
      invalid: an update whose error is undefined (non-finite, zero or overflowing norm),
        flagged before any reconstruction (no score).
    """

    attack: str
    round: int
    client: int
    malicious: bool
    first: bool
    error: float
    iterations: Optional[int]
    ran: int
    loss_at: Optional[tuple]
    invalid: bool = False


def participations(run_dir: str) -> list[Participation]:
    """The FedREDefense participations recorded in ``run_dir`` (ValueError for a run of
    another defense, or one run with early rejection, whose trajectories stop early)."""
    cfg = records.read_config(run_dir)
    if cfg.get("defense") != "fedredefense":
        raise ValueError(f"{run_dir}: not a FedREDefense run (defense {cfg.get('defense')!r})")
    dcfg = cfg.get("defense_config", {})
    if dcfg.get("redefense_reject_at") is not None:
        raise ValueError(f"{run_dir}: run with early rejection (redefense_reject_at); its trajectories stop early")
    gamma = dcfg.get("gamma", 0.6)
    rounds = records.read_rounds(run_dir)
    attack = cfg.get("attack", "none")
    seen: set[int] = set()
    out = []
    for rec in rounds:
        bad = set(rec.get("malicious", [])) if attack != "none" else set()  # no attack: all benign
        n = len(rec["participants"])
        to_gamma = rec.get("to_gamma", [None] * n)
        loss_at = rec.get("loss_at", [None] * n)
        for i, c in enumerate(rec["participants"]):
            err, its = rec["error"][i], rec["iterations"][i]
            invalid = err is None  # an update without error: flagged before any reconstruction
            if invalid:
                reached = None
            else:
                reached = to_gamma[i] if "to_gamma" in rec else (its if err <= gamma else None)
            out.append(Participation(
                attack=attack, round=rec["round"], client=c, malicious=c in bad, first=c not in seen,
                error=float("nan") if invalid else float(err), iterations=reached, ran=0 if invalid else int(its),
                loss_at=tuple(loss_at[i]) if loss_at[i] is not None else None, invalid=invalid))
            seen.add(c)
    return out


def score_names(parts: list[Participation]) -> list[str]:
    """``error``, ``iterations`` and ``loss@b`` when some participation has a trajectory."""
    names = ["error", "iterations"]
    if any(p.loss_at is not None for p in parts):
        names += [f"loss@{b}" for b in BUDGETS]
    return names


def scores(parts: list[Participation], name: str) -> np.ndarray:
    """``[len(parts)]`` float64 scores named ``name`` (see the module docstring); NaN where
    a ``loss@b`` is not defined (the reconstruction ran fewer than ``b`` iterations
    without reaching gamma, e.g. a smaller cap)."""
    if name == "error":
        return np.array([p.error for p in parts], dtype=np.float64)
    if name == "iterations":
        return np.array([np.nan if p.invalid else p.iterations if p.iterations is not None else p.ran + 1
                         for p in parts], dtype=np.float64)
    if not name.startswith("loss@"):
        raise ValueError(f"unknown score {name!r}: error, iterations or loss@b")
    b = int(name[len("loss@"):])
    if b not in BUDGETS:
        raise ValueError(f"score {name!r}: budgets are {BUDGETS}")
    k = BUDGETS.index(b)
    out = []
    for p in parts:
        if p.loss_at is None:
            out.append(np.nan)
        elif p.loss_at[k] is not None:
            out.append(p.loss_at[k])
        elif p.iterations is not None and p.iterations <= b:
            out.append(p.error)
        else:
            out.append(np.nan)
    return np.array(out, dtype=np.float64)


class Separation(NamedTuple):
    """One score on one group of participations.

    Attributes:
      auc: area under the ROC curve (None without both benign and malicious participations).
      clean_catch: fraction of malicious participations above the largest benign score.
      benign_max: the largest benign score (the lowest threshold with no false positive).
      malicious_min: the smallest malicious score.
      used: participations with the score defined.
    """

    auc: Optional[float]
    clean_catch: Optional[float]
    benign_max: Optional[float]
    malicious_min: Optional[float]
    used: int


def _scored(parts: list[Participation], name: str) -> tuple[np.ndarray, np.ndarray]:
    """Scores ``name`` and malicious labels of the participations where the score is defined."""
    s = scores(parts, name)
    y = np.array([p.malicious for p in parts], dtype=bool)
    ok = ~np.isnan(s)
    return s[ok], y[ok]


def separation(parts: list[Participation], name: str) -> Separation:
    """:class:`Separation` of score ``name`` over ``parts`` (participations where it is NaN left out)."""
    from sklearn.metrics import roc_auc_score

    s, y = _scored(parts, name)
    ben, mal = s[~y], s[y]
    both = ben.size > 0 and mal.size > 0
    return Separation(
        auc=float(roc_auc_score(y, s)) if both else None,
        clean_catch=float(np.mean(mal > ben.max())) if both else None,
        benign_max=float(ben.max()) if ben.size else None,
        malicious_min=float(mal.min()) if mal.size else None,
        used=int(s.size))


def roc(parts: list[Participation], name: str) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates of score ``name`` over ``parts`` (sklearn's ``roc_curve``)."""
    from sklearn.metrics import roc_curve

    s, y = _scored(parts, name)
    fpr, tpr, _ = roc_curve(y, s)
    return fpr, tpr


def paper_rule(parts: list[Participation], gamma: float) -> tuple[Optional[float], Optional[float]]:
    """True- and false-positive rates of the paper's rule ``error > gamma`` over the valid
    participations (None without malicious / benign ones)."""
    mal = [p.error > gamma for p in parts if p.malicious and not p.invalid]
    ben = [p.error > gamma for p in parts if not p.malicious and not p.invalid]
    return (float(np.mean(mal)) if mal else None), (float(np.mean(ben)) if ben else None)


def budget(parts: list[Participation], factor: float = 3.0, multiple: int = 10) -> int:
    """The budget ``B`` of the budget rule from benign first participations of one setting.

    The budget rule flags a client whose first reconstruction has not reached gamma after
    ``B`` outer iterations; it is the paper's rule with the first-participation cap set to
    ``B`` (``--first_cap=B``: a reconstruction stops at gamma, so a client passes exactly when
    it reaches gamma within the cap). With ``m`` the most iterations any benign first
    participation of ``parts`` needed::

        B = multiple * ceil(factor * m / multiple)

    Args:
      parts: participations of calibration runs of the setting (runs without attack, or
        their benign clients); malicious and later participations are ignored.
      factor: headroom over the slowest benign client (> 1).
      multiple: ``B`` is rounded up to a multiple of this.

    Returns:
      ``B`` (int). ValueError when there is no benign first participation, or one never
      reached gamma (its cap was too small to calibrate on).
    """
    ben = [p for p in parts if p.first and not p.malicious and not p.invalid]
    if not ben:
        raise ValueError("no benign first participation to calibrate on")
    never = [p.client for p in ben if p.iterations is None]
    if never:
        raise ValueError(f"benign client(s) {never[:5]} never reached gamma: raise the first cap and rerun")
    m = max(p.iterations for p in ben)
    return int(multiple * np.ceil(factor * m / multiple))


def over_budget(parts: list[Participation], b: int) -> np.ndarray:
    """``[len(parts)]`` bool: first participations the budget rule with budget ``b`` flags
    (gamma not reached within ``b`` iterations; an invalid update is flagged anyway); False
    for later participations, which the rule leaves to the paper's."""
    return np.array([p.first and (p.invalid or p.iterations is None or p.iterations > b) for p in parts], bool)


def loss_bound(parts: list[Participation], at: int = 50, margin: float = 0.06) -> float:
    """The bound ``L`` of the loss rule from the benign participations of one setting.

    The loss rule flags a client whose reconstruction loss after ``at`` outer iterations is
    above ``L`` (a reconstruction that reached gamma sooner passes); it runs as early rejection,
    ``--redefense_reject_at=at --redefense_reject_above=L``, on top of the paper's rule::

        L = max over benign participations of loss@at + margin

    Args:
      parts: participations of calibration runs of the setting; malicious ones are ignored.
      at: one of ``BUDGETS``.
      margin: added to the largest benign loss.

    Returns:
      ``L`` (float). ValueError when no benign participation ran ``at`` iterations.
    """
    s = scores([p for p in parts if not p.malicious and not p.invalid], f"loss@{at}")
    if not np.isfinite(s).any():
        raise ValueError(f"no benign participation with a loss after {at} iterations to calibrate on")
    return float(np.nanmax(s) + margin)


def over_loss(parts: list[Participation], at: int, bound: float) -> np.ndarray:
    """``[len(parts)]`` bool: participations the loss rule flags (loss after ``at`` iterations
    above ``bound``; an invalid update is flagged anyway). The paper's rule still flags the
    others whose error ends above gamma."""
    s = scores(parts, f"loss@{at}")
    return np.array([p.invalid or (not np.isnan(v) and v > bound) for p, v in zip(parts, s)], bool)
