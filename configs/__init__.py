"""The shipped job configs, installed as the package ``evf.configs`` (see pyproject.toml)."""
