"""docs/flags.md is the generated flag reference of the current flags."""

import os

from fedredefense_jax import cli, flagdoc

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "flags.md")


def test_docs_flags_md_is_current():
    with open(DOC) as f:
        committed = f.read()
    assert committed == flagdoc.markdown(), "docs/flags.md is stale: python -m fedredefense_jax.flagdoc docs/flags.md"


def test_every_flag_of_the_settings_is_documented():
    text = flagdoc.markdown()
    names = [*cli.EXPERIMENT, *cli.PLUGIN_SETTINGS["attack"], *cli.PLUGIN_SETTINGS["defense"]]
    assert len(names) > 50
    assert [n for n in names if f"| `--{n}` |" not in text] == []
    assert "| fashion_mnist | 0.5 | 0.2 | 0.1 | 5e-06 | 800 | 2000 |" in text  # Table 7
