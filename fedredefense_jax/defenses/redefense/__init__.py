"""FedREDefense (Xie et al., ICML 2024): expel clients whose update cannot be reconstructed.

For every participating client ``i`` the server keeps a small *distilled local knowledge*
``K_i = (X_i, Y_i, alpha_i)``: ``n = images_per_class * K`` synthetic images ``X_i``, their
label logits ``Y_i`` (soft labels ``softmax(Y_i)``) and an inner learning rate ``alpha_i``.
Training the global model ``w_0`` for ``N`` full-batch gradient steps on ``K_i`` should
reproduce the client's update ``g_i``. A bi-level optimisation (Algorithm 2) refines ``K_i``
to minimise the reconstruction loss; the client is expelled when the error stays above
``gamma``.

Math (one client, everything flat ``[P]``)::

    f(w; X, Y)   = -1/(n K) sum_{b,k} softmax(Y)_{bk} log_softmax(apply(w, X))_{bk}
    d_0 = 0,  d_{n+1} = d_n - alpha * grad_w f(w_0 + d_n; X, Y)      (n = 0..N-1)
    L(X, Y, alpha) = ||d_N - g||^2 / ||g||^2          (= ||w_N - w_0 - g||^2 / ||g||^2)
    m_p <- mu m_p + dL/dp ;  p <- p - lr_p m_p       (p in {X, Y, alpha}, mu = 0.5)

The inner loop tracks the displacement ``d_n = w_n - w_0`` instead of ``w_n`` so that the
small reconstructed update does not lose float32 precision against the large ``w_0``.

Dynamic optimisation (Section 4.4, the default ``variant='dynamic'``): each outer iteration
first evaluates ``L``; if ``L < gamma`` the client stops and its error is that ``L``;
otherwise one outer SGD-momentum step is taken. At most ``first_cap`` iterations when the
client is seen for the first time, ``later_cap`` afterwards; if ``L`` never went below
``gamma`` the error is the last ``L`` computed. ``iterations`` counts the loss evaluations
(as the authors' ``true_iter``): a client already below ``gamma`` costs 1 iteration.
Appendix B.3's variants: ``'continuous'`` (fixed ``first_cap``=500 / ``later_cap``=60 steps,
no early stop, error = ``L`` after the steps) and ``'intermittent'`` (500 steps at the first
participation, 500 steps again once ``interval``=10 rounds passed since the client's last
optimisation, otherwise inference only: error = ``L`` with the current knowledge).

Facts from the authors' public code (xyq7/FedREDefense) followed here: images initialised
as standard-normal noise in normalised input space (``torch.randn``; the paper says
"uniform noise", available as ``init_noise='uniform'``), label logits zero,
momentum 0.5 on all three optimisers, full batch (``batch_syn = n``), the CE averaged over
samples and classes, and fresh optimisers (zero momentum) at every participation
(``reset_momentum=True``; the buffers are still kept in the state so a chunked run and a
later ``reset_momentum=False`` run can carry them).

Modules: ``settings`` (:class:`RedefenseConfig`, Table 7), ``distillation`` (the knowledge
and the math above, for one client), ``reconstruction`` (Algorithm 2 for all participating
clients in one compiled program per chunk; its docstring says how), ``defense`` (the
registered defense: its state, the expel decision, the aggregation of the kept updates).
"""

from fedredefense_jax.defenses.redefense.defense import (
    RedefenseState,
    invalid_updates,
    iteration_caps,
    make_redefense,
    rejection_bound,
)
from fedredefense_jax.defenses.redefense.distillation import (
    Knowledge,
    init_knowledge,
    inner_loop,
    outer_loss,
    outer_value_and_grad,
    sgd_momentum_step,
    soft_cross_entropy,
)
from fedredefense_jax.defenses.redefense.reconstruction import (
    BUDGETS,
    ReconstructionResult,
    Reconstructor,
    bucket_size,
    get_reconstructor,
    reconstruct,
    resolve_layout,
)
from fedredefense_jax.defenses.redefense.settings import (
    AGGREGATORS,
    DEFAULT_VARIANT,
    LAYOUTS,
    TABLE7,
    VARIANT_CAPS,
    VARIANTS,
    ConfigError,
    RedefenseConfig,
    canonical_dataset,
    make_config,
)

__all__ = [
    # settings
    "AGGREGATORS", "DEFAULT_VARIANT", "LAYOUTS", "TABLE7", "VARIANT_CAPS", "VARIANTS", "ConfigError",
    "RedefenseConfig", "canonical_dataset", "make_config",
    # distillation
    "Knowledge", "init_knowledge", "inner_loop", "outer_loss", "outer_value_and_grad", "sgd_momentum_step",
    "soft_cross_entropy",
    # reconstruction
    "BUDGETS", "ReconstructionResult", "Reconstructor", "bucket_size", "get_reconstructor", "reconstruct",
    "resolve_layout",
    # defense
    "RedefenseState", "invalid_updates", "iteration_caps", "make_redefense", "rejection_bound",
]
