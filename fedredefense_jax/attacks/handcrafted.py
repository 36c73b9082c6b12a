"""Handcrafted model-poisoning attacks that need no optimisation.

* ``none``: every client honest.
* ``mpaf`` (Cao & Gong, CVPRW 2022): every malicious client sends
  ``s * (w_init - w^{t-1})`` (``s = attack_scale``, 3), dragging the global model to the initial one;
  ``w^{t-1}`` is the model the client trained from (under FLCert its group's model).
* ``sign_flip`` (not in the paper): each malicious client sends ``-g_i``, the negation of
  its own genuine update.
"""

from __future__ import annotations

from fedredefense_jax.attacks import register
from fedredefense_jax.attacks.base import Attack, AttackContext, AttackInput, ScaleSettings, no_state, replace_malicious


@register("none")
def make_none(ctx: AttackContext) -> Attack:
    del ctx
    return Attack("none", no_state, lambda state, inp: (inp.updates, state))


@register("mpaf", settings=ScaleSettings)
def make_mpaf(ctx: AttackContext) -> Attack:
    scale = ctx.config.attack_scale

    def apply(state, inp: AttackInput):
        start = inp.global_params if inp.start_params is None else inp.start_params
        return replace_malicious(inp, scale * (ctx.init_params - start)), state

    return Attack("mpaf", no_state, apply)


@register("sign_flip")
def make_sign_flip(ctx: AttackContext) -> Attack:
    del ctx
    return Attack("sign_flip", no_state, lambda state, inp: (replace_malicious(inp, -inp.updates), state))
