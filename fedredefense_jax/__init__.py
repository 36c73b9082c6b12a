"""fedredefense-jax: FedREDefense (ICML 2024) and FL poisoning attacks/defenses in JAX."""

__version__ = "0.1.0"
